"""RAFS v6: the upstream nydus fixture, writer round trips, malformed input.

The fixture (``rafs-v6/rafs-v6-2.2.boot``, nydus-image 2.2, zstd chunks with blake3
digests) must list the tree dump.erofs lists and every file must read back from its blob
with verified digests.
"""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from snapshotter.errdefs import FormatError
from snapshotter.formats import erofs, rafs
from snapshotter.formats.index import ROOT_INO, LayerIndex, NodeKind
from snapshotter.formats.rafs import v6 as rafs_v6
from tests.unit.test_rafs_v5 import _check_round_trip, lookup, read_file
from tests.unit.test_rafs_writer import FIXTURES, SAMPLE, Spec, write_v6

V6 = FIXTURES / "rafs-v6"
BOOT = V6 / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


@pytest.fixture(scope="module")
def boot() -> bytes:
    return BOOT.read_bytes()


@pytest.fixture(scope="module")
def index(boot: bytes) -> LayerIndex:
    return rafs.build_index(boot)


# --- the upstream fixture ------------------------------------------------------------------


def test_fixture_tree(index: LayerIndex) -> None:
    assert index.format == "rafs-v6"
    assert sorted(index.root.children) == ["lib.rs", "sync_io.rs"]
    lib, sync = lookup(index, "lib.rs"), lookup(index, "sync_io.rs")
    assert (lib.ino, sync.ino) == (133 + 2, 136 + 2)  # nid + 2
    assert (lib.size, sync.size) == (16931, 13400)
    assert lib.mode == sync.mode == 0o644 and lib.nlink == 1
    assert lib.mtime_ns == 1676819553_628661334
    assert index.root.ino == ROOT_INO and index.root.mode == 0o755 and index.root.nlink == 2
    assert index.prefetch_inos == []


def test_fixture_matches_dump_erofs(index: LayerIndex) -> None:
    res = subprocess.run(["dump.erofs", f"--device={V6 / 'blobs' / BLOB_ID}", "--ls",
                          "--path=/", str(BOOT)], capture_output=True, text=True, check=True)
    listed = {name: int(nid) for nid, name in
              re.findall(r"^\s*(\d+)\s+\d+\s+(\S+)$", res.stdout, re.M)}
    assert listed.pop(".") == listed.pop("..") == 128
    assert {name: ino - 2 for name, ino in index.root.children.items()} == listed


def test_fixture_files_read_with_verified_digests(index: LayerIndex) -> None:
    blobs = {BLOB_ID: (V6 / "blobs" / BLOB_ID).read_bytes()}
    for name in ("lib.rs", "sync_io.rs"):
        node = lookup(index, name)
        (chunk,) = node.chunks
        assert chunk.compression == "zstd" and chunk.digest.startswith("blake3:")
        assert chunk.blob == BLOB_ID
        data = read_file(node, blobs)
        assert len(data) == node.size and data.startswith(b"// Copyright (C) 2020 Alibaba")


def test_fixture_blob_table(boot: bytes) -> None:
    (blob,) = rafs.parse_blob_table(boot)
    assert (blob.blob_id, blob.compression, blob.digest, blob.chunk_count) == (
        BLOB_ID, "zstd", "blake3", 2)
    assert blob.compressed_size == (V6 / "blobs" / BLOB_ID).stat().st_size


# --- writer round trips --------------------------------------------------------------------

_MANY = [Spec(f"many/entry_with_a_long_name_{i:04d}", "reg", data=bytes([i % 256]))
         for i in range(400)]


@pytest.mark.parametrize("compression", ["none", "lz4_block", "zstd", "gzip"])
@pytest.mark.parametrize("digest", ["sha256", "blake3"])
@pytest.mark.parametrize("compact", [True, False])
def test_round_trip(compression: str, digest: str, compact: bool) -> None:
    specs = [*SAMPLE, Spec("long", "symlink", 0o777, target=b"x" * 4090)]
    image = write_v6(specs, compression=compression, digest=digest, compact=compact)
    index = _check_round_trip(image, specs)
    assert lookup(index, "etc/passwd") is lookup(index, "etc/hosts")
    assert lookup(index, "etc/passwd").nlink == 2
    assert all(c.digest.startswith(digest + ":") for n in index.nodes.values() for c in n.chunks)


def test_multi_block_directory_and_prefetch() -> None:
    image = write_v6([*_MANY, Spec("z", "reg", data=b"z")], prefetch=("z", "many"))
    index = _check_round_trip(image, _MANY)
    assert len(lookup(index, "many").children) == 400
    paths = {n.ino: p for p, n in index.walk()}
    assert [paths[i] for i in index.prefetch_inos[:2]] == ["z", "many/entry_with_a_long_name_0000"]
    assert len(index.prefetch_inos) == 401


def test_whiteouts() -> None:
    specs = [Spec("d/.wh.gone", "reg"), Spec("d/.wh..wh..opq", "reg"), Spec("d/x", "reg")]
    index = rafs.build_index(write_v6(specs).bootstrap)
    d = lookup(index, "d")
    assert sorted(d.children) == ["gone", "x"] and d.xattrs == {rafs.OPAQUE_XATTR: b"y"}
    assert lookup(index, "d/gone").kind is NodeKind.CHAR


# --- malformed bootstraps ------------------------------------------------------------------

SMALL = [Spec("a/f", "reg", data=b"data" * 2000), Spec("a/g", "reg", data=b"x")]


@pytest.fixture(scope="module")
def small() -> bytes:
    return write_v6(SMALL).bootstrap


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _inode(boot: bytes, path: str) -> erofs.Inode:
    sb = erofs.parse_superblock(boot)
    nid = sb.root_nid
    for part in path.split("/"):
        inode = erofs.parse_inode(boot, sb, nid)
        ents = erofs.parse_dirents(erofs.inode_data(boot, sb, inode), sb.block_size)
        nid = next(e.nid for e in ents if e.name == part.encode())
    return erofs.parse_inode(boot, sb, nid)


def test_superblock_errors(small: bytes) -> None:
    sb = 1024
    ext = rafs_v6.EXT_SUPERBLOCK_OFFSET
    cases = {
        "checksum": _patch(small, sb + 4, "<I", 1),
        "block bits": _patch(small, sb + 12, "<B", 10),
        "ext slots": _patch(small, sb + 13, "<B", 1),
        "zero inodes": _patch(small, sb + 16, "<Q", 0),
        "xattr area": _patch(small, sb + 44, "<I", 1),
        "incompat": _patch(small, sb + 80, "<I", 0x4),
        "compat": _patch(small, sb + 8, "<I", 0),
        "devt slot": _patch(small, sb + 88, "<H", 12),
        "devices vs blobs": _patch(small, sb + 86, "<H", 2),
        "too many devices": _patch(small, sb + 86, "<H", 255),
        "meta blkaddr": _patch(small, sb + 40, "<I", 1 << 30),
        "two compressions": _patch(small, ext, "<Q", 0x1 | 0x2 | 0x4),
        "no digest": _patch(small, ext, "<Q", 0x1),
        "tarfs": _patch(small, ext, "<Q", 0x1 | 0x4 | rafs.FLAG_TARFS_MODE),
        "chunk size": _patch(small, ext + 20, "<I", 5000),
        "blob table misaligned": _patch(small, ext + 8, "<Q", 4097),
        "blob table size": _patch(small, ext + 16, "<I", 255),
        "blob table past end": _patch(small, ext + 8, "<Q", 1 << 40),
        "chunk table size": _patch(small, ext + 32, "<Q", 81),
        "chunk table in superblock block": _patch(small, ext + 24, "<Q", 0),
        "chunk table overlaps blobs": _patch(small, ext + 24, "<Q", 4096),
        "prefetch past end": _patch(small, ext + 40, "<QI", 1 << 40, 4),
        "size not block multiple": small + b"\0",
    }
    for what, data in cases.items():
        with pytest.raises(FormatError):
            rafs.build_index(data)
            pytest.fail(what)


def test_blob_entry_errors(small: bytes) -> None:
    at = 4096
    cases = {
        "blob index": _patch(small, at + 64, "<I", 1),
        "chunk size": _patch(small, at + 68, "<I", 8192),
        "compression": _patch(small, at + 76, "<I", 9),
        "digest": _patch(small, at + 80, "<I", 2),
        "zran": _patch(small, at + 84, "<I", 0x1 | rafs_v6.BLOB_ZRAN),
        "encrypted": _patch(small, at + 84, "<I", 0x1 | rafs_v6.BLOB_ENCRYPTED),
        "cipher": _patch(small, at + 216, "<I", 1),
        "absurd size": _patch(small, at + 88, "<Q", 1 << 50),
        "chunk count": _patch(small, at + 72, "<I", 1 << 30),
        "blob id": small[:at] + b"/" * 64 + small[at + 64 :],
        "device tag": small[:1408] + b"f" * 64 + small[1408 + 64 :],
    }
    for what, data in cases.items():
        with pytest.raises(FormatError):
            rafs.build_index(data)
            pytest.fail(what)


def test_chunk_index_errors(small: bytes) -> None:
    f = _inode(small, "a/f")
    at = f.offset + 32  # compact inode, no xattrs: indexes follow at once
    first = struct.unpack_from("<HHI", small, at)
    cases = {
        "device 0": _patch(small, at, "<HHI", first[0], 0, first[2]),
        "device 2": _patch(small, at, "<HHI", first[0], 2, first[2]),
        "unknown chunk id": _patch(small, at, "<HHI", 77, first[1], first[2]),
        "wrong block": _patch(small, at, "<HHI", first[0], first[1], 99),
        "hole": _patch(small, at, "<HHI", first[0], first[1], 0xFFFFFFFF),
        "not chunk-based": _patch(small, f.offset, "<H", 0),
        "block map": _patch(small, f.offset + 16, "<I", 0),
        "size past chunks": _patch(small, f.offset + 8, "<I", 1 << 31),
    }
    for what, data in cases.items():
        with pytest.raises(FormatError):
            rafs.build_index(data)
            pytest.fail(what)


def test_directory_errors(small: bytes) -> None:
    a = _inode(small, "a")
    sb = erofs.parse_superblock(small)
    data_at = a.offset + a.core_size + a.xattr_size  # inline dirents
    ents = erofs.parse_dirents(erofs.inode_data(small, sb, a), sb.block_size)
    f_slot = next(i for i, e in enumerate(ents) if e.name == b"f")
    cases = {
        "cycle": _patch(small, data_at + 12 * f_slot, "<Q", sb.root_nid),
        "dot": _patch(small, data_at, "<Q", sb.root_nid),
        "nameoff": _patch(small, data_at + 8, "<H", 13),
        "type": _patch(small, data_at + 12 * f_slot + 10, "<B", erofs.FT_SYMLINK),
        "nid past end": _patch(small, data_at + 12 * f_slot, "<Q", 1 << 40),
        "root nid": _patch(small, 1024 + 14, "<H", ents[f_slot].nid),
    }
    for what, data in cases.items():
        with pytest.raises(FormatError):
            rafs.build_index(data)
            pytest.fail(what)


@pytest.mark.parametrize("cut", [0, 1023, 1100, 1400, 4096, 8192, 12288])
def test_truncated_bootstrap(small: bytes, cut: int) -> None:
    with pytest.raises(FormatError):
        rafs.build_index(small[:cut])
