"""Properties of the RAFS/EROFS readers and the chunk codec.

* Robustness: any bytes, and any mutation of a real or written bootstrap (bit flips,
  truncations, offsets and counts overwritten with extreme values), either parse into a
  valid ``LayerIndex`` or raise FormatError; never another exception. Work is bounded by
  the input's size (the readers charge a budget), so examples stay small and finish;
  memory is checked with tracemalloc against a bound linear in the input's size.
* Round trip: whatever tree the test writer lays out as RAFS v5 or v6 (any file types,
  modes, owners, times, xattrs, hard links, chunking, compression and digest), the index
  reproduces it and every file's bytes come back through its verified chunks.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from snapshotter.errdefs import FormatError
from snapshotter.formats import chunkcodec, detect, erofs, rafs
from tests.unit.test_rafs_v5 import _check_round_trip, lookup
from tests.unit.test_rafs_writer import FIXTURES, SAMPLE, Spec, write_v5, write_v6

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=80, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

V5_FIXTURE = (FIXTURES / "rafs-v5-sha256-nocompress" / "bootstrap").read_bytes()
V6_FIXTURE = (FIXTURES / "rafs-v6" / "rafs-v6-2.2.boot").read_bytes()
BASES = {
    "v5-fixture": V5_FIXTURE,
    "v6-fixture": V6_FIXTURE,
    "v5-written": write_v5(SAMPLE, compression="zstd", prefetch=("etc",)).bootstrap,
    "v6-written": write_v6(SAMPLE, compression="lz4_block", prefetch=("etc",)).bootstrap,
    "v6-extended": write_v6(SAMPLE, compact=False).bootstrap,
}
# Where the structures are: superblocks (past the magic, which unit tests cover), tables,
# inodes; the rest is mostly padding.
_HOT = {
    "v5": [(8, 80)] + [(8192, 1 << 30)] * 4,
    "v6": [(1028, 1536), (4096, 4352)] + [(8192, 1 << 30)] * 4,
}
_VALUES = st.sampled_from([0, 1, 2, 7, 8, 0x7F, 0xFF, 0x1000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                           1 << 40, (1 << 64) - 1])


def parse_or_format_error(data: bytes) -> None:
    """The contract: parse into a validated index, or raise FormatError only."""
    try:
        index = rafs.build_index(data)
    except FormatError as exc:
        event(" ".join(str(exc).split()[:3]))
        return
    event("parsed")
    index.validate()
    for _, node in index.walk():
        assert node.ino in index.nodes


@st.composite
def mutated(draw: Any) -> bytes:
    name = draw(st.sampled_from(sorted(BASES)))
    data = bytearray(BASES[name])
    ranges = _HOT[name[:2]]
    for _ in range(draw(st.integers(1, 4))):
        lo, hi = draw(st.sampled_from(ranges))
        hi = min(hi, len(data))
        if hi - lo < 8:
            break
        pos = draw(st.integers(lo, hi - 8))
        op = draw(st.sampled_from(["flip", "flip", "u16", "u32", "u32", "u64", "truncate",
                                   "zero"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "zero":
            n = draw(st.integers(1, 64))
            data[pos : pos + n] = bytes(len(data[pos : pos + n]))
        else:
            width = {"u16": 2, "u32": 4, "u64": 8}[op]
            value = draw(st.one_of(_VALUES, st.integers(0, len(data) * 2)))
            data[pos : pos + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_bootstraps_parse_or_raise_format_error(data: bytes) -> None:
    parse_or_format_error(data)


_HEADS = st.sampled_from([b"", V5_FIXTURE[:80], V5_FIXTURE[:8192], V6_FIXTURE[:1536],
                          V6_FIXTURE[:4352]])


@FUZZ
@given(_HEADS, st.binary(max_size=12000))
def test_any_bytes_parse_or_raise_format_error(head: bytes, tail: bytes) -> None:
    parse_or_format_error(head + tail)
    assert detect.sniff(head + tail) in (None, "rafs-v5", "rafs-v6")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_memory_is_bounded_by_the_input(data: bytes) -> None:
    tracemalloc.start()
    try:
        parse_or_format_error(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * len(data) + (4 << 20)


@FUZZ
@given(st.binary(max_size=9000), st.sampled_from([512, 4096]))
def test_dirents_parse_or_raise_format_error(data: bytes, block_size: int) -> None:
    try:
        ents = erofs.parse_dirents(data, block_size)
    except FormatError:
        return
    assert all(0 < len(e.name) <= 255 for e in ents)


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(chunkcodec.COMPRESSIONS),
       st.integers(0, 70000))
def test_decompress_any_bytes(data: bytes, compression: str, size: int) -> None:
    try:
        out = chunkcodec.decompress(data, compression, size)
    except FormatError:
        return
    assert len(out) == size


# --- round trip ----------------------------------------------------------------------------

_names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1,
                 max_size=12).filter(lambda n: n not in (".", "..") and not n.startswith(".wh.")
                                     and len(n.encode()) <= 255)
_xattrs = st.dictionaries(
    st.tuples(st.sampled_from(["user.", "trusted.", "security."]),
              st.text(alphabet="abcxyz_.", min_size=1, max_size=8)).map("".join),
    st.binary(max_size=24), max_size=3)


@st.composite
def trees(draw: Any) -> list[Spec]:
    specs: dict[str, Spec] = {}
    for _ in range(draw(st.integers(0, 14))):
        parts = [draw(_names) for _ in range(draw(st.integers(1, 3)))]
        path = "/".join(parts)
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if path in specs or any(p.startswith(path + "/") for p in specs) or any(
                p in specs and specs[p].kind != "dir" for p in prefixes):
            continue
        kind = draw(st.sampled_from(["dir", "reg", "reg", "symlink", "char", "block", "fifo",
                                     "hardlink"]))
        targets = sorted(p for p, s in specs.items() if s.kind == "reg")
        if kind == "hardlink" and not targets:
            kind = "reg"
        spec = Spec(path, kind, mode=draw(st.integers(0, 0o7777)),
                    uid=draw(st.sampled_from([0, 1, 65535, 65536, (1 << 32) - 1])),
                    gid=draw(st.integers(0, (1 << 32) - 1)),
                    mtime=draw(st.integers(0, (1 << 32) - 1)),
                    mtime_nsec=draw(st.sampled_from([0, 1, 999_999_999])),
                    xattrs=draw(_xattrs))
        if kind == "reg":
            spec.data = draw(st.binary(max_size=9000))
        elif kind == "symlink":
            spec.target = draw(st.binary(min_size=1, max_size=80)).replace(b"\0", b"x")
        elif kind in ("char", "block"):
            spec.rdev = (draw(st.integers(0, 4095)), draw(st.integers(0, (1 << 20) - 1)))
        elif kind == "hardlink":
            spec = Spec(path, "hardlink", link=draw(st.sampled_from(targets)))
        specs[path] = spec
    return list(specs.values())


def _names_per_inode(specs: list[Spec]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for spec in specs:
        target = spec.link if spec.kind == "hardlink" else spec.path
        counts[target] = counts.get(target, 0) + 1
    return counts


@ROUND_TRIP
@given(trees(), st.sampled_from(chunkcodec.COMPRESSIONS), st.sampled_from(["sha256", "blake3"]),
       st.sampled_from([4096, 8192]), st.booleans())
def test_round_trip(specs: list[Spec], compression: str, digest: str, chunk_size: int,
                    compact: bool) -> None:
    counts = _names_per_inode(specs)
    for image in (write_v5(specs, chunk_size=chunk_size, compression=compression,
                           digest=digest),
                  write_v6(specs, chunk_size=chunk_size, compression=compression,
                           digest=digest, compact=compact)):
        index = _check_round_trip(image, specs)
        for spec in specs:
            if spec.kind not in ("dir", "hardlink"):
                assert lookup(index, spec.path).nlink == counts[spec.path], spec.path
        assert len(list(index.walk())) == len(specs) + 1 + len(
            {p for s in specs for p in _parents(s.path)} - {s.path for s in specs})
        again = rafs.build_index(image.bootstrap)
        assert {p: n.ino for p, n in again.walk()} == {p: n.ino for p, n in index.walk()}


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
