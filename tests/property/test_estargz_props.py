"""Properties of the eStargz reader.

* Round trip: whatever tree the test writer encodes, the reader's index reproduces it
  (paths, kinds, metadata, hard links, prefetch list) and every file's bytes come back
  through ``read_chunk``, under any chunking, shared members and either footer.
* Robustness: any bytes given to ``parse_footer``, ``extract_toc``, ``build_index`` or
  ``read_chunk`` either parse or raise FormatError (never another exception).
"""

from __future__ import annotations

import contextlib
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.errdefs import FormatError
from snapshotter.formats import estargz as E
from snapshotter.formats.index import Chunk, LayerIndex, Node, NodeKind
from snapshotter.tools.inspect.estargz import tree_json
from tests import estargz_writer as W

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_RESERVED = {W.TOC_NAME, W.PREFETCH_LANDMARK, W.NO_PREFETCH_LANDMARK}

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\0"),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", "..") and not n.startswith(".wh."))


@dataclass
class Layer:
    """A generated layer: the writer's entries plus what the reader must show."""

    entries: list[W.TarEntry] = field(default_factory=list)
    dirs: list[str] = field(default_factory=lambda: [""])
    implicit: set[str] = field(default_factory=set)
    regs: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # hardlink path -> target path
    by_path: dict[str, W.TarEntry] = field(default_factory=dict)


_META = st.fixed_dictionaries({
    "mode": st.integers(0, 0o7777),
    "uid": st.integers(0, 70000),
    "gid": st.integers(0, 70000),
    "mtime": st.integers(0, 2**33),
    "xattrs": st.dictionaries(st.sampled_from(["user.a", "user.b", "trusted.x"]),
                              st.binary(max_size=20), max_size=2),
})


def _entry(draw: st.DrawFn, layer: Layer, kind: str, path: str) -> W.TarEntry | None:
    meta = draw(_META)
    if kind == "dir":
        return W.directory(path, **meta)
    if kind == "reg":
        return W.reg(path, draw(st.binary(max_size=3000) | st.just(b"")), **meta)
    if kind == "symlink":
        target = draw(st.text(st.characters(codec="utf-8", exclude_characters="\0"),
                              min_size=1, max_size=30))
        return W.symlink(path, target, **meta)
    if kind == "hardlink":
        return W.hardlink(path, draw(st.sampled_from(layer.regs))) if layer.regs else None
    if kind in ("char", "block"):
        major, minor = draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))
        make = W.char_device if kind == "char" else W.block_device
        return make(path, major, minor, **meta)
    return W.fifo(path, **meta)


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    layer = Layer()
    kinds = st.sampled_from(["dir", "dir", "reg", "reg", "reg", "symlink", "hardlink",
                             "char", "block", "fifo"])
    for _ in range(draw(st.integers(0, 20))):
        parent = draw(st.sampled_from(layer.dirs))
        name = draw(names)
        path = f"{parent}/{name}" if parent else name
        if path in layer.by_path or path in layer.implicit or (not parent and name in _RESERVED):
            continue
        kind = draw(kinds)
        if kind == "dir" and draw(st.booleans()):
            layer.implicit.add(path)  # no entry: created by its children, if any
            layer.dirs.append(path)
            continue
        entry = _entry(draw, layer, kind, path)
        if entry is None:
            continue
        layer.entries.append(entry)
        layer.by_path[path] = entry
        if kind == "dir":
            layer.dirs.append(path)
        elif kind == "reg":
            layer.regs.append(path)
        elif kind == "hardlink":
            layer.links[path] = entry.link_name
    return layer


def _open(blob: bytes) -> tuple[bytes, LayerIndex]:
    footer = E.parse_footer(blob[-E.FOOTER_MAX :])
    start, end = footer.toc_range(len(blob))
    toc_json = E.extract_toc(blob[start:end])
    return toc_json, E.build_index(toc_json, len(blob))


def _read(blob: bytes, node: Node) -> bytes:
    return b"".join(E.read_chunk(blob[c.blob_offset : c.blob_end], c) for c in node.chunks)


def _expected_paths(layer: Layer) -> set[str]:
    paths = set(layer.by_path)
    for path in list(paths):
        parts = path.split("/")
        paths.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return paths


_KIND = {"dir": NodeKind.DIR, "reg": NodeKind.REG, "symlink": NodeKind.SYMLINK,
         "char": NodeKind.CHAR, "block": NodeKind.BLOCK, "fifo": NodeKind.FIFO}


def _check_node(blob: bytes, entry: W.TarEntry, node: Node) -> None:
    assert node.kind is _KIND[entry.type]
    assert (node.mode, node.uid, node.gid) == (entry.mode, entry.uid, entry.gid)
    assert node.mtime_ns == entry.mtime * 10**9
    assert node.xattrs == dict(entry.xattrs)
    if entry.type == "reg":
        assert node.size == len(entry.data) and _read(blob, node) == entry.data
    elif entry.type == "symlink":
        assert node.link_target == entry.link_name.encode()
    elif entry.type in ("char", "block"):
        assert (node.rdev_major, node.rdev_minor) == (entry.dev_major, entry.dev_minor)


@ROUND_TRIP
@given(layer=layers(), chunk_size=st.sampled_from([1, 7, 100, 1000, 4 << 20]),
       min_chunk_size=st.sampled_from([0, 0, 700, 5000]), legacy=st.booleans(),
       data=st.data())
def test_writer_reader_round_trip(layer: Layer, chunk_size: int, min_chunk_size: int,
                                  legacy: bool, data: st.DataObject) -> None:
    prioritized = data.draw(st.lists(st.sampled_from(layer.regs), unique=True)
                            if layer.regs else st.just([]))
    out = W.build_estargz(layer.entries, chunk_size=chunk_size, min_chunk_size=min_chunk_size,
                          legacy=legacy, prioritized=prioritized)
    toc_json, index = _open(out.blob)
    assert toc_json == out.toc_json and E.toc_digest(toc_json) == out.toc_digest
    nodes = {path: node for path, node in index.walk()}
    assert set(nodes) - {""} == _expected_paths(layer)
    for path, entry in layer.by_path.items():
        if entry.type == "hardlink":
            continue
        _check_node(out.blob, entry, nodes[path])
    for path, target in layer.links.items():
        assert nodes[path].ino == nodes[target].ino
    for path in layer.regs:
        names_of = [p for p, t in layer.links.items() if t == path]
        assert nodes[path].nlink == 1 + len(names_of)
    for path in set(nodes) - set(layer.by_path):
        assert nodes[path].kind is NodeKind.DIR and nodes[path].mode == 0o755
    expected_prefetch = [nodes[p].ino for p in prioritized if layer.by_path[p].data]
    assert index.prefetch_inos == expected_prefetch
    assert index.no_prefetch == (not prioritized)
    report = tree_json(index)[-1]
    assert report["files"] + report["directories"] == len(nodes) - 1


@ROUND_TRIP
@given(layer=layers())
def test_writer_output_reads_as_an_ordinary_tar_gz(layer: Layer) -> None:
    out = W.build_estargz(layer.entries, chunk_size=500)
    members = W.read_as_tar(out.blob)
    assert [info.name for info, _ in members][-1] == W.TOC_NAME
    got = {info.name.rstrip("/"): data for info, data in members}
    for path, entry in layer.by_path.items():
        assert got[path] == (entry.data if entry.type == "reg" else b"")


# --- robustness: parse or FormatError ---------------------------------------------------


def _parses_or_format_error(fn: Any, *args: Any, **kw: Any) -> None:
    # Any exception other than FormatError (DigestMismatch is one) fails the test.
    with contextlib.suppress(FormatError):
        fn(*args, **kw)


@FUZZ
@given(st.binary(max_size=120))
def test_parse_footer_on_any_bytes(tail: bytes) -> None:
    _parses_or_format_error(E.parse_footer, tail)


@FUZZ
@given(offset=st.integers(0, 2**64 - 1), legacy=st.booleans(),
       flips=st.lists(st.tuples(st.integers(0, 50), st.integers(1, 255)), max_size=3))
def test_parse_footer_on_damaged_footers(offset: int, legacy: bool,
                                         flips: list[tuple[int, int]]) -> None:
    footer = bytearray(W.legacy_footer(0) if legacy else W.estargz_footer(0))
    footer[-35:-19] = b"%016x" % offset  # the hex TOC offset, in both footers
    for pos, bits in flips:
        footer[pos % len(footer)] ^= bits
    _parses_or_format_error(E.parse_footer, bytes(footer))


_TOC_MEMBER = W.build_estargz([W.reg("a", b"x")]).blob


@FUZZ
@given(st.binary(max_size=2000) | st.binary(max_size=2000).map(gzip.compress))
def test_extract_toc_on_any_bytes(member: bytes) -> None:
    _parses_or_format_error(E.extract_toc, member, max_toc_bytes=1000)


@FUZZ
@given(cut=st.integers(0, 600), flips=st.lists(st.tuples(st.integers(0, 10**6),
                                                         st.integers(1, 255)), max_size=4))
def test_extract_toc_on_damaged_members(cut: int, flips: list[tuple[int, int]]) -> None:
    footer = E.parse_footer(_TOC_MEMBER[-51:])
    member = bytearray(_TOC_MEMBER[footer.toc_offset : len(_TOC_MEMBER) - 51 - cut])
    for pos, bits in flips:
        if member:
            member[pos % len(member)] ^= bits
    _parses_or_format_error(E.extract_toc, bytes(member))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                               max_size=4),
    max_leaves=12,
)
_KEYS = ["name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "offset",
         "innerOffset", "devMajor", "devMinor", "xattrs", "digest", "chunkOffset",
         "chunkSize", "chunkDigest"]
_GOOD: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["a", "a/b", "./", "/x/../y", ".wh.a", "a/.wh..wh..opq", "c",
                             ".prefetch.landmark", ".no.prefetch.landmark", "b/c/d", "b",
                             "stargz.index.json", "a/.wh.b", ".wh..wh.meta/x"]),
    "type": st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo",
                             "chunk", "reg", "reg", "chunk"]),
    "linkName": st.sampled_from(["a", "a/b", "/a", "b", "c", "./a"]),
    "size": st.integers(0, 3000),
    "offset": st.integers(0, 3000),
    "innerOffset": st.integers(0, 600),
    "chunkOffset": st.integers(0, 3000),
    "chunkSize": st.integers(0, 3000),
    "modtime": st.sampled_from(["2020-01-01T00:00:00Z", "0001-01-01T00:00:00Z"]),
    "xattrs": st.dictionaries(st.sampled_from(["user.a", "user.b"]),
                              st.sampled_from(["eA==", "", None]), max_size=2),
    "digest": st.sampled_from(["", W.sha256(b"")]),
    "mode": st.integers(0, 0o177777),
    "uid": st.integers(0, 9),
}
_BAD: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["..", "a/../..", "x" * 256, "a\0b"]),
    "type": st.just("sock"),
    "linkName": st.sampled_from(["", "../a"]),
    "size": st.integers(-2, -1),
    "offset": st.integers(-2, -1),
    "modtime": st.just("bad"),
    "xattrs": st.just({"": 3}),
    "digest": st.just("sha256:zz"),
}
# Well-typed entries reach the tree rules; the others exercise the field checks.
_good_entries = st.fixed_dictionaries(
    {"name": _GOOD["name"], "type": _GOOD["type"]},
    optional={k: v for k, v in _GOOD.items() if k not in ("name", "type")},
)
_typed = st.fixed_dictionaries(
    {"name": _GOOD["name"] | _BAD["name"], "type": _GOOD["type"] | _BAD["type"]},
    optional={k: v | _BAD[k] if k in _BAD else v
              for k, v in _GOOD.items() if k not in ("name", "type")},
)
toc_entries = (
    _typed
    | st.fixed_dictionaries({}, optional={key: _GOOD.get(key, json_values) for key in _KEYS})
    | st.dictionaries(st.sampled_from(_KEYS), json_values, max_size=6)
)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 10**6))
def test_build_index_on_any_bytes(doc: bytes, blob_size: int) -> None:
    _parses_or_format_error(E.build_index, doc, blob_size)


@FUZZ
@given(entries=st.lists(toc_entries, max_size=12), blob_size=st.integers(0, 4000),
       version=st.sampled_from([1, 1, 1, 2, "1", None]))
def test_build_index_on_any_toc(entries: list[dict[str, Any]], blob_size: int,
                                version: Any) -> None:
    doc = json.dumps({"version": version, "entries": entries}).encode()
    _parses_or_format_error(E.build_index, doc, blob_size)


@FUZZ
@given(entries=st.lists(_good_entries, max_size=15),
       blob_size=st.just(10**6) | st.integers(0, 4000))
def test_build_index_on_typed_tocs(entries: list[dict[str, Any]], blob_size: int) -> None:
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    _parses_or_format_error(E.build_index, doc, blob_size)


@FUZZ
@given(doc=json_values)
def test_build_index_on_any_json(doc: Any) -> None:
    _parses_or_format_error(E.build_index, json.dumps(doc).encode(), 100)


@FUZZ
@given(data=st.binary(max_size=200) | st.binary(max_size=200).map(gzip.compress),
       inner=st.integers(0, 300), size=st.integers(0, 300),
       digest=st.sampled_from(["", W.sha256(b""), "sha256:" + "0" * 64, "md5:x"]),
       compression=st.sampled_from(["gzip", "gzip", "zstd"]))
def test_read_chunk_on_any_bytes(data: bytes, inner: int, size: int, digest: str,
                                 compression: str) -> None:
    chunk = Chunk(0, size, 0, len(data), inner, digest, compression)
    _parses_or_format_error(E.read_chunk, data, chunk, require_digest=False)
