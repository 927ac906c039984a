"""Seed corpora for the fuzz targets, built from real inputs.

Sources, all produced on the spot (nothing here is hand-written bytes except two
footers the writers cannot produce):

* eStargz blobs from the test writer ``tests/estargz_writer.py`` (every entry type,
  chunked files, shared gzip members with ``innerOffset``, prefetch landmarks, the legacy
  footer, whiteouts, odd names, stored-deflate members), and the blob that
  stargz-snapshotter's ``ctr-remote image convert --estargz`` produced, embedded in
  ``tests/unit/test_estargz.py``;
* the nydus fixtures in ``tests/fixtures/nydus/`` (RAFS v5 and v6 bootstraps made by
  ``nydus-image``, and chunks of their data blobs);
* RAFS v5/v6 bootstraps and blobs from ``snapshotter.tools.convert`` with each chunk
  compression and digest, and bootstrap layers (plain, gzip, zstd tars) holding them;
* EROFS images from erofs-utils' ``mkfs.erofs`` (flat, chunk-based, with a blob device,
  compact and extended inodes), when it is installed; without it those seeds are
  silently left out. (``ctr-remote`` needs a running containerd to convert anything, so
  its output comes from the embedded blob above instead.)

``build(target)`` returns a target's seeds; ``write(directory)`` writes them as
``<directory>/<target>/<sha1 of content>``. Seeds longer than a target's ``max_len``
are left out (libFuzzer would cut them). Raises nothing for a missing optional tool;
errors in the project's own writers propagate (they are bugs).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import zstandard

from snapshotter.formats import detect, estargz, rafs
from snapshotter.formats.index import Chunk, LayerIndex, NodeKind
from snapshotter.tools.convert.image import bootstrap_tar
from snapshotter.tools.convert.tree import Spec, compress
from snapshotter.tools.convert.write_v5 import write_v5
from snapshotter.tools.convert.write_v6 import write_v6
from tests import estargz_writer as W
from tests.fuzz.targets import TARGETS, chunk_input, toc_json_input

__all__ = ["build", "write"]

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "nydus"


def _data(n: int, salt: int = 0) -> bytes:
    """``n`` deterministic, poorly compressible bytes (so chunks stay chunk-sized)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (salt, counter)).digest()
        counter += 1
    return bytes(out[:n])


# --- eStargz --------------------------------------------------------------------------


class Layer(NamedTuple):
    """An eStargz blob with its TOC JSON and the TOC member's offset."""

    blob: bytes
    toc_json: bytes
    toc_offset: int


def _sample_entries() -> list[W.TarEntry]:
    return [
        W.directory("etc", mode=0o750, uid=1, gid=2, mtime=1_600_000_000),
        W.reg("etc/hosts", b"127.0.0.1 localhost\n", uid=1000, gid=1000, uname="u", gname="g"),
        W.reg("etc/big", _data(6000, 1)),
        W.reg("etc/empty"),
        W.symlink("etc/abs", "/etc/hosts"),
        W.symlink("etc/up", "../../../x"),
        W.hardlink("etc/hard", "etc/hosts"),
        W.char_device("dev/null", 1, 3, mode=0o666),
        W.block_device("dev/sda", 8, 0, mode=0o660),
        W.fifo("dev/fifo"),
        W.reg("xa", b"x", xattrs={"user.foo": b"bar", "security.capability": b"\x01\x00\xff"}),
    ]


def _odd_toc(toc: dict[str, Any]) -> None:
    """Edits a real TOC the way other producers write them (still a valid TOC)."""
    entries = toc["entries"]
    entries.insert(0, {"name": "./", "type": "dir", "mode": 0o755})
    for e in entries:
        if e.get("type") == "dir":
            e["name"] = "./" + e["name"]
            e["modtime"] = "2023-05-06T07:08:09.123456789+02:00"
        e["unknownKey"] = None


@functools.cache
def estargz_layers() -> tuple[Layer, ...]:
    """The eStargz blobs every eStargz target draws from (see the module docstring)."""
    many = [W.reg(f"d/f{i:03d}", _data(i * 7, i)) for i in range(40)]
    blobs = [
        W.build_estargz(_sample_entries()),
        W.build_estargz(_sample_entries(), chunk_size=1024),
        W.build_estargz([W.directory("d"), *many], min_chunk_size=512),
        W.build_estargz(_sample_entries(), prioritized=["etc/hosts", "etc/big"]),
        W.build_estargz(_sample_entries(), legacy=True),
        W.build_estargz(_sample_entries(), landmark=False, level=0, chunk_size=2048),
        W.build_estargz([
            W.directory("keep"), W.reg("keep/a", b"a"), W.whiteout("gone"), W.opaque("keep"),
            W.reg(".wh..wh.plnk/1", b""), W.whiteout("keep/old"),
        ]),
        W.build_estargz([
            W.reg("x/with space \u00fc", b"u"), W.reg("n" * 255, b"n"),
            W.reg("a/b/c/d/e/f/g/h/i/j", b"deep"), W.symlink("l", "t" * 1000),
        ]),
        W.build_estargz([]),
        W.build_estargz(_sample_entries(), toc_modifier=_odd_toc),
    ]
    layers = [Layer(b.blob, b.toc_json, _toc_offset(b.blob)) for b in blobs]
    real = _converter_blob()
    if real is not None:
        start, end = estargz.parse_footer(real[-estargz.FOOTER_MAX :]).toc_range(len(real))
        layers.append(Layer(real, estargz.extract_toc(real[start:end]), start))
    return tuple(layers)


def _tar_with(name: str, data: bytes, fmt: int, pax: dict[str, str] | None = None,
              end_blocks: bool = True) -> bytes:
    """A tar holding one regular file, written by Python's ``tarfile`` in ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o444
        if pax:
            info.pax_headers = dict(pax)
        tar.addfile(info, io.BytesIO(data))
    out = buf.getvalue()
    return out if end_blocks else out[: -2 * 512]


def _toc_members(toc_json: bytes) -> list[bytes]:
    """TOC members as other tar writers make them: a PAX header, a GNU long name."""
    name = estargz.TOC_TAR_NAME
    tars = [
        _tar_with(name, toc_json, tarfile.PAX_FORMAT,
                  {"path": name, "comment": "x" * 40, "mtime": "1.5"}),
        _tar_with(name, toc_json, tarfile.PAX_FORMAT, {"size": str(len(toc_json))}),
        _tar_with("./" + "d/" * 60 + "/../" * 60 + name, toc_json, tarfile.GNU_FORMAT),
    ]
    return [gzip.compress(t, mtime=0) for t in tars]


def _repacked(layer: Layer, member: bytes) -> bytes:
    """``layer``'s blob with its TOC member replaced by ``member`` (footer rewritten)."""
    return layer.blob[: layer.toc_offset] + member + W.estargz_footer(layer.toc_offset)


def _toc_offset(blob: bytes) -> int:
    return estargz.parse_footer(blob[-estargz.FOOTER_MAX :]).toc_offset


def _converter_blob() -> bytes | None:
    """The ``ctr-remote`` blob embedded in the eStargz unit tests, if it is still there."""
    try:
        from tests.unit import test_estargz
    except ImportError:
        return None
    encoded = getattr(test_estargz, "REAL_BLOB_B64", None)
    if not isinstance(encoded, str):
        return None
    return base64.b64decode("".join(encoded.split()))


def _index_chunks(index: LayerIndex, limit: int) -> list[Chunk]:
    chunks = [c for _, n in sorted(index.nodes.items()) if n.kind is NodeKind.REG
              for c in n.chunks]
    return chunks[:limit]


# --- nydus ----------------------------------------------------------------------------


def _rafs_specs() -> list[Spec]:
    return [
        Spec("etc", "dir", 0o755, mtime=1_700_000_000),
        Spec("etc/passwd", "reg", 0o644, uid=1, gid=2, data=b"root:x:0:0\n" * 500,
             xattrs={"user.a": b"b", "security.capability": b"\x01\x02"}),
        Spec("etc/hosts", "hardlink", link="etc/passwd"),
        Spec("bin/sh", "symlink", 0o777, target=b"../usr/bin/busybox"),
        Spec("dev/null", "char", 0o666, rdev=(1, 3)),
        Spec("dev/sda1", "block", 0o660, rdev=(8, 300)),
        Spec("run/fifo", "fifo", 0o600),
        Spec("run/sock", "sock", 0o600),
        Spec("big", "reg", 0o600, uid=70000, mtime=5, mtime_nsec=7, data=_data(3 * 4096 + 5)),
        Spec("empty", "reg", 0o644),
        Spec("gone", "char", 0, rdev=(0, 0)),
        Spec("opq", "dir", 0o755, xattrs={"trusted.overlay.opaque": b"y"}),
        *(Spec(f"many/n{i:02d}", "reg", data=b"%d" % i) for i in range(30)),
        Spec("many/.wh.n00", "reg"),  # whiteouts: a name that exists, one that does not,
        Spec("many/.wh.gone", "reg"),  # an opaque marker and AUFS metadata
        Spec("opq/.wh..wh..opq", "reg"),
        Spec(".wh..wh.plnk/1", "reg"),
    ]


class Rafs(NamedTuple):
    """A RAFS bootstrap and its data blobs by id (empty when not at hand)."""

    bootstrap: bytes
    blobs: dict[str, bytes]


@functools.cache
def rafs_images() -> tuple[Rafs, ...]:
    """RAFS bootstraps: the nydus-image fixtures, then ``snapshotter.tools.convert`` output."""
    out: list[Rafs] = []
    for boot in (FIXTURES / "rafs-v5-sha256-nocompress" / "bootstrap",
                 FIXTURES / "rafs-v6" / "rafs-v6-2.2.boot"):
        if boot.is_file():
            blobs = {p.name: p.read_bytes() for p in (boot.parent / "blobs").glob("*")
                     if p.stat().st_size <= 64 << 10}
            out.append(Rafs(boot.read_bytes(), blobs))
    specs = _rafs_specs()
    writers: list[Callable[[], Any]] = [
        lambda: write_v5(specs, chunk_size=4096),
        lambda: write_v5(specs, chunk_size=4096, compression="lz4_block", digest="blake3",
                         prefetch=("etc", "big")),
        lambda: write_v5(specs, chunk_size=8192, compression="zstd"),
        lambda: write_v5(specs, chunk_size=4096, compression="gzip", blob_trailer=True),
        lambda: write_v6(specs, chunk_size=4096),
        lambda: write_v6(specs, chunk_size=4096, compression="lz4_block", compact=False),
        lambda: write_v6(specs, chunk_size=8192, compression="zstd", digest="sha256",
                         prefetch=("etc", "big")),
        lambda: write_v6(specs, chunk_size=4096, compression="gzip", blob_trailer=True),
    ]
    for make in writers:
        image = make()
        out.append(Rafs(image.bootstrap, dict(image.blobs)))
    return tuple(out)


def _rafs_chunk_seeds() -> Iterable[bytes]:
    for image in rafs_images():
        if not image.blobs:
            continue
        index = rafs.build_index(image.bootstrap)
        for c in _index_chunks(index, 6):
            blob = image.blobs.get(c.blob)
            if blob is None or c.blob_end > len(blob):
                continue
            data = blob[c.blob_offset : c.blob_end]
            yield chunk_input(c.compression, c.size, data, digest=c.digest,
                              inner_offset=c.inner_offset, decode=True)
            yield chunk_input(c.compression, c.size, data)


def _bootstrap_layers(boot: bytes) -> Iterable[bytes]:
    tar = bootstrap_tar(boot)
    yield tar
    yield gzip.compress(tar, mtime=0)
    yield zstandard.ZstdCompressor().compress(tar)
    yield _tar_with("image.boot", boot, tarfile.GNU_FORMAT)
    yield _tar_with("./image/image.boot", boot, tarfile.USTAR_FORMAT, end_blocks=False)
    yield _tar_with("image/image.boot", boot, tarfile.PAX_FORMAT,
                    {"path": "image/image.boot", "comment": "nydus", "size": str(len(boot))})
    yield gzip.compress(_tar_with("image/" + "l" * 150 + "/../image.boot", boot,
                                  tarfile.GNU_FORMAT), mtime=0)


def _crowded_layer() -> bytes:
    """A gzip bootstrap layer with more tar members than the reader scans (1,100)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(1100):
            tar.addfile(tarfile.TarInfo(f"image/f{i}"), io.BytesIO(b""))
    return gzip.compress(buf.getvalue(), mtime=0)


# --- EROFS ----------------------------------------------------------------------------


def _erofs_source(root: Path) -> None:
    (root / "d1" / "d2").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "d1" / "big").write_bytes(_data(2 * 4096 + 123))
    (root / "d1" / "tail").write_bytes(b"x" * 5000)
    os.link(root / "a.txt", root / "d1" / "hard")
    os.symlink("../a.txt", root / "d1" / "link")
    os.symlink("t" * 300, root / "longlink")
    os.mkfifo(root / "fifo")
    for i in range(120):  # more than one directory block
        (root / "d1" / "d2" / f"file_with_a_long_name_{i:04d}").touch()
    for path, name, value in ((root / "a.txt", "user.foo", b"bar"),
                              (root / "a.txt", "user.shared", b"same"),
                              (root / "d1" / "big", "user.shared", b"same"),
                              (root / "d1", "trusted.overlay.opaque", b"y")):
        with contextlib.suppress(OSError):  # no (trusted) xattrs here: fewer xattr seeds
            os.setxattr(path, name, value)
    os.utime(root / "a.txt", ns=(0, 981173106_123456789))


_MKFS_VARIANTS: tuple[tuple[str, ...], ...] = (
    (),
    ("-Eforce-inode-extended",),
    ("-Eforce-inode-compact", "-x1"),
    ("--chunksize=4096",),
    ("--chunksize=8192", "--blobdev={blob}"),
    ("-zlz4",),  # compressed files: refused as unsupported, a path worth covering
)


@functools.cache
def erofs_images() -> tuple[bytes, ...]:
    """Images from ``mkfs.erofs`` (none when it is not installed or a variant fails)."""
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        return ()
    out: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="lazysnap-fuzz-erofs-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        _erofs_source(src)
        for i, variant in enumerate(_MKFS_VARIANTS):
            img, blob = Path(tmp) / f"{i}.img", Path(tmp) / f"{i}.blob"
            args = [a.format(blob=blob) for a in variant]
            res = subprocess.run([mkfs, "--preserve-mtime", *args, str(img), str(src)],
                                 capture_output=True, check=False, timeout=60)
            if res.returncode == 0 and img.is_file():
                out.append(img.read_bytes())
    return tuple(out)


# --- per target -----------------------------------------------------------------------


def _footer() -> Iterable[bytes]:
    for layer in estargz_layers():
        yield layer.blob[-estargz.FOOTER_MAX :]
        yield layer.blob[-2048:]
    # Recognised but refused footers (no writer here produces them).
    extra = b"SG" + (16 + 17).to_bytes(2, "little") + b"%016xSTARGZEXTERNALTOC" % 1234
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + len(extra).to_bytes(2, "little")
    yield header + extra + b"\x01\x00\x00\xff\xff" + bytes(8)
    yield bytes(8) + (1234).to_bytes(8, "little") + bytes(16) + b"GnUlInUx"
    for image in rafs_images():
        yield image.bootstrap[:2048]


def _toc_member() -> Iterable[bytes]:
    for layer in estargz_layers():
        start, end = estargz.parse_footer(layer.blob[-estargz.FOOTER_MAX :]).toc_range(
            len(layer.blob))
        yield layer.blob[start:end]
    yield from _toc_members(estargz_layers()[0].toc_json)


def _toc_json() -> Iterable[bytes]:
    for layer in estargz_layers():
        yield toc_json_input(layer.toc_json, len(layer.blob), layer.toc_offset)
        yield toc_json_input(layer.toc_json, len(layer.blob), None)


def _flow() -> Iterable[bytes]:
    for layer in estargz_layers():
        yield layer.blob
    first = estargz_layers()[0]
    for member in _toc_members(first.toc_json):
        yield _repacked(first, member)


def _rafs() -> Iterable[bytes]:
    for image in rafs_images():
        yield image.bootstrap


def _erofs() -> Iterable[bytes]:
    yield from erofs_images()
    for image in rafs_images():
        if detect.sniff(image.bootstrap) == detect.RAFS_V6:
            yield image.bootstrap


def _chunkcodec() -> Iterable[bytes]:
    yield from _rafs_chunk_seeds()
    for layer in estargz_layers()[:4]:
        index = estargz.build_index(layer.toc_json, len(layer.blob), data_end=layer.toc_offset)
        for c in _index_chunks(index, 4):
            yield chunk_input("gzip", c.size, layer.blob[c.blob_offset : c.blob_end],
                              digest=c.digest, inner_offset=c.inner_offset, decode=True)
    text = b"the quick brown fox jumps over the lazy dog\n" * 60
    for algo in ("lz4_block", "zstd", "gzip"):
        yield chunk_input(algo, len(text), compress(text, algo))
        yield chunk_input(algo, 0, compress(b"", algo))
    yield chunk_input("none", 5, b"hello", digest="sha256:" + hashlib.sha256(b"hello").hexdigest())


def _bootstrap_tar() -> Iterable[bytes]:
    for image in rafs_images()[:2] + rafs_images()[-4:-3]:
        yield from _bootstrap_layers(image.bootstrap)
    yield _crowded_layer()


_BUILDERS: dict[str, Callable[[], Iterable[bytes]]] = {
    "estargz_footer": _footer,
    "estargz_toc_member": _toc_member,
    "estargz_toc_json": _toc_json,
    "estargz_flow": _flow,
    "rafs": _rafs,
    "erofs": _erofs,
    "chunkcodec": _chunkcodec,
    "nydus_bootstrap_tar": _bootstrap_tar,
}


def build(target: str) -> list[bytes]:
    """The distinct seeds of ``target`` that fit its ``max_len``, in a stable order.

    Raises KeyError for an unknown target.
    """
    limit = TARGETS[target].max_len
    seen: dict[bytes, None] = {}
    for seed in _BUILDERS[target]():
        if len(seed) <= limit:
            seen.setdefault(seed, None)
    return list(seen)


def write(directory: Path, targets: Iterable[str] | None = None) -> dict[str, int]:
    """Write the seeds of ``targets`` (default: all) under ``directory/<target>/``.

    File names are the sha1 of the content, so writing twice changes nothing. Returns
    the number of seeds per target.
    """
    counts: dict[str, int] = {}
    for target in TARGETS if targets is None else targets:
        out = directory / target
        out.mkdir(parents=True, exist_ok=True)
        seeds = build(target)
        for seed in seeds:
            (out / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        counts[target] = len(seeds)
    return counts
