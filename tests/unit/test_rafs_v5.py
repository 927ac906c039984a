"""RAFS v5: the upstream nydus fixture, writer round trips, overlay rules, malformed input.

The fixture (``rafs-v5-sha256-nocompress``, built by nydus-image, see its README) must give
exactly the tree upstream recorded in ``tree.json`` and every file must read back from the
blob with matching chunk digests and the md5 sums listed after that tree.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest

from snapshotter.errdefs import FormatError
from snapshotter.formats import chunkcodec, rafs
from snapshotter.formats.index import ROOT_INO, LayerIndex, Node, NodeKind
from snapshotter.formats.rafs import v5 as rafs_v5
from snapshotter.tools.inspect.estargz import tree_json
from tests.unit.test_rafs_writer import FIXTURES, SAMPLE, Image, Spec, write_v5

V5 = FIXTURES / "rafs-v5-sha256-nocompress"
BLOB_ID = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"


@pytest.fixture(scope="module")
def boot() -> bytes:
    return (V5 / "bootstrap").read_bytes()


@pytest.fixture(scope="module")
def index(boot: bytes) -> LayerIndex:
    return rafs.build_index(boot)


def lookup(index: LayerIndex, path: str) -> Node:
    node = index.root
    for part in filter(None, path.split("/")):
        found = index.lookup(node.ino, part)
        assert found is not None, path
        node = found
    return node


def read_file(node: Node, blobs: dict[str, bytes]) -> bytes:
    return b"".join(chunkcodec.decode_chunk(blobs[c.blob][c.blob_offset : c.blob_end], c)
                    for c in node.chunks)


def _without_empty_contents(entry: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    if out.get("contents"):
        out["contents"] = [_without_empty_contents(e) for e in out["contents"]]
    else:
        out.pop("contents", None)  # tree 1.x printed "contents": [] for empty dirs and links
    return out


def _expected() -> tuple[list[dict[str, Any]], dict[str, str]]:
    raw = (V5 / "tree.json").read_text()
    doc, end = json.JSONDecoder().raw_decode(raw)
    md5s = {path: digest for digest, path in (line.split(None, 1) for line in
                                              raw[end:].splitlines() if line.strip())}
    return doc, md5s


# --- the upstream fixture ------------------------------------------------------------------


def test_fixture_tree_equals_tree_json(index: LayerIndex) -> None:
    doc, _ = _expected()
    want = _without_empty_contents(doc[0])
    want["name"] = "."  # upstream ran tree on the mount point and printed its path, ""
    got = tree_json(index)
    assert index.format == "rafs-v5"
    assert got[0] == want
    # tree followed the symlinks to "/" and "/////..." on the host and counted them as
    # directories; tree_json leaves absolute targets unresolved and counts them as files.
    assert (got[1]["directories"] + 2, got[1]["files"] - 2) == (doc[1]["directories"],
                                                                doc[1]["files"])


def test_fixture_files_match_chunk_digests_and_md5(index: LayerIndex) -> None:
    _, md5s = _expected()
    blobs = {BLOB_ID: (V5 / "blobs" / BLOB_ID).read_bytes()}
    checked = set()
    for path, node in index.walk():
        if node.kind is NodeKind.REG:
            data = read_file(node, blobs)
            assert len(data) == node.size
            if "/" + path in md5s:
                assert hashlib.md5(data).hexdigest() == md5s["/" + path], path
                checked.add("/" + path)
    assert checked == set(md5s)
    chunks = [c for n in index.nodes.values() for c in n.chunks]
    assert len(chunks) == 27 and len({(c.blob_offset, c.blob_end) for c in chunks}) == 23
    assert all(c.digest.startswith("sha256:") and c.compression == "none" and c.blob == BLOB_ID
               for c in chunks)


def test_fixture_hardlinks_symlinks_and_attributes(index: LayerIndex) -> None:
    names = ["hardlink-test/foo", "hardlink-test/test.sh", "normal-file-test/test.sh"]
    linked = {lookup(index, p).ino for p in names}
    assert linked == {5}
    assert index.get(5).nlink == 3 and index.get(5).size == 944 and index.get(5).mode == 0o775
    link = lookup(index, "symlink-test/foo")
    assert link.kind is NodeKind.SYMLINK and link.link_target == b"../normal-file-test/"
    assert lookup(index, "symlink-test/root-1").link_target == b"/" * 17
    root = index.root
    assert root.ino == ROOT_INO and root.mode == 0o755 and root.nlink == 5
    shadow = lookup(index, "normal-file-test/busybox/"
                           "1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475"
                           "/etc/shadow")
    assert (shadow.mode, shadow.uid, shadow.gid, shadow.mtime_ns) == (0o600, 0, 0,
                                                                       1668232305 * 10**9)
    big = lookup(index, "normal-file-test/holefiles/head-hole-1")
    assert [c.size for c in big.chunks] == [1 << 20, 1 << 20, 7]
    assert index.prefetch_inos == []


def test_fixture_blob_table(boot: bytes) -> None:
    (blob,) = rafs.parse_blob_table(boot)
    assert (blob.blob_id, blob.compression, blob.digest, blob.chunk_size) == (
        BLOB_ID, "none", "sha256", 1 << 20)
    assert (blob.chunk_count, blob.compressed_size) == (23, 3508766)


# --- writer round trips --------------------------------------------------------------------


def _check_round_trip(image: Image, specs: list[Spec]) -> LayerIndex:
    index = rafs.build_index(image.bootstrap)
    for spec in specs:
        node = lookup(index, spec.path)
        if spec.kind == "hardlink":
            assert node is lookup(index, spec.link)
            continue
        assert node.kind.name.lower().startswith(spec.kind[:3]), spec.path
        assert (node.mode, node.uid, node.gid) == (spec.mode, spec.uid, spec.gid), spec.path
        assert node.mtime_ns == spec.mtime * 10**9 + spec.mtime_nsec, spec.path
        assert node.xattrs == spec.xattrs, spec.path
        if spec.kind == "reg":
            assert read_file(node, image.blobs) == spec.data
        elif spec.kind == "symlink":
            assert node.link_target == spec.target
        elif spec.kind in ("char", "block"):
            assert (node.rdev_major, node.rdev_minor) == spec.rdev
    return index


@pytest.mark.parametrize("compression", ["none", "lz4_block", "zstd", "gzip"])
@pytest.mark.parametrize("digest", ["sha256", "blake3"])
def test_round_trip(compression: str, digest: str) -> None:
    image = write_v5(SAMPLE, compression=compression, digest=digest)
    index = _check_round_trip(image, SAMPLE)
    assert lookup(index, "etc/passwd").nlink == 2
    assert lookup(index, "etc").nlink == 2 and index.root.nlink == 2 + 4
    assert all(c.digest.startswith(digest + ":") for n in index.nodes.values() for c in n.chunks)


def test_prefetch_table_expands_directories() -> None:
    specs = [Spec("a/x", "reg", data=b"1"), Spec("a/b/y", "reg", data=b"2"),
             Spec("z", "reg", data=b"3"), Spec("a/l", "symlink", target=b"x")]
    image = write_v5(specs, prefetch=("z", "a"))
    index = rafs.build_index(image.bootstrap)
    paths = {n.ino: p for p, n in index.walk()}
    assert [paths[i] for i in index.prefetch_inos] == ["z", "a/b/y", "a/x"]


def test_oci_whiteouts_become_overlay_whiteouts() -> None:
    specs = [
        Spec("d/.wh.gone", "reg", 0o644, uid=3, mtime=9),
        Spec("d/.wh..wh..opq", "reg"),
        Spec("d/kept", "reg", data=b"k"),
        Spec("d/.wh.kept", "reg"),
        Spec(".wh..wh.plnk/inner", "reg", data=b"aufs"),
        Spec("e/.wh.a", "reg"),
        Spec("e/.wh.b", "hardlink", link="e/.wh.a"),
        Spec("o/dev", "char", 0o600, rdev=(0, 0)),
    ]
    index = rafs.build_index(write_v5(specs).bootstrap)
    d = lookup(index, "d")
    assert sorted(d.children) == ["gone", "kept"] and d.xattrs == {rafs.OPAQUE_XATTR: b"y"}
    gone = lookup(index, "d/gone")
    assert (gone.kind, gone.mode, gone.rdev_major, gone.rdev_minor) == (NodeKind.CHAR, 0, 0, 0)
    assert (gone.uid, gone.mtime_ns) == (3, 9 * 10**9)
    assert lookup(index, "d/kept").kind is NodeKind.REG
    assert sorted(index.root.children) == ["d", "e", "o"]
    a, b = lookup(index, "e/a"), lookup(index, "e/b")
    assert a.kind is b.kind is NodeKind.CHAR and a.ino != b.ino and a.nlink == b.nlink == 1
    assert lookup(index, "o/dev").kind is NodeKind.CHAR
    assert all(n.ino in index.nodes for _, n in index.walk())


def test_whiteout_directory_and_bad_whiteout_names_are_errors() -> None:
    with pytest.raises(FormatError, match="used as a directory"):
        rafs.build_index(write_v5([Spec("d/.wh.x", "dir")]).bootstrap)
    with pytest.raises(FormatError, match="invalid file name"):
        rafs.build_index(write_v5([Spec("d/.wh.", "reg")]).bootstrap)


def test_sockets_are_left_out() -> None:
    index = rafs.build_index(write_v5([Spec("s", "sock"), Spec("f", "reg")]).bootstrap)
    assert sorted(index.root.children) == ["f"]


# --- malformed bootstraps ------------------------------------------------------------------


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _record(boot: bytes, index: int) -> int:
    return int(struct.unpack_from("<I", boot, 8192 + 4 * (index - 1))[0]) << 3


@pytest.mark.parametrize("cut", [0, 7, 100, 8192, 8193, 8300, 9000, 12000, -1])
def test_truncated_bootstrap(boot: bytes, cut: int) -> None:
    with pytest.raises(FormatError):
        rafs.build_index(boot[:cut])


def test_superblock_errors(boot: bytes) -> None:
    cases = {
        "magic": _patch(boot, 0, "<I", 0x12345678),
        "version": _patch(boot, 4, "<I", 0x400),
        "sb size": _patch(boot, 8, "<I", 4096),
        "chunk size": _patch(boot, 12, "<I", 3 << 20),
        "flags": _patch(boot, 16, "<Q", 1 << 40),
        "inodes count": _patch(boot, 24, "<Q", 1 << 40),
        "inode table offset": _patch(boot, 32, "<Q", 1 << 62),
        "inode table misaligned": _patch(boot, 32, "<Q", 8193),
        "inode table entries": _patch(boot, 56, "<I", 0xFFFFFFFF),
        "blob table size": _patch(boot, 64, "<I", 0xFFFFFFF0),
        "blob table overlaps": _patch(boot, 48, "<Q", 8192),
        "ext blob entries": _patch(boot, 68, "<I", 1 << 30),
        "prefetch entries": _patch(boot, 60, "<I", 1 << 30),
    }
    for what, data in cases.items():
        with pytest.raises(FormatError):
            rafs.build_index(data)
            pytest.fail(what)


def test_inode_errors(boot: bytes) -> None:
    root, dir2 = _record(boot, 1), _record(boot, 2)
    cases = {
        "cycle to root": _patch(boot, dir2 + 92, "<II", 1, 1),
        "cycle to sibling": _patch(boot, dir2 + 92, "<II", 3, 1),
        "children past table": _patch(boot, root + 92, "<II", 2, 1 << 30),
        "root not a dir": _patch(boot, root + 60, "<I", 0o100644),
        "root ino": _patch(boot, root + 40, "<Q", 7),
        "ino too big": _patch(boot, dir2 + 40, "<Q", 1 << 40),
        "dir ino reused": _patch(boot, _record(boot, 3) + 40, "<Q", 2),
        "name too long": _patch(boot, dir2 + 100, "<H", 300),
        "empty name": _patch(boot, dir2 + 100, "<H", 0),
        "bad type": _patch(boot, dir2 + 60, "<I", 0o170755),
        "mtime nsec": _patch(boot, dir2 + 108, "<I", 2_000_000_000),
        "table entry into superblock": _patch(boot, 8192 + 4, "<I", 5),
        "table entry past end": _patch(boot, 8192 + 4, "<I", 0xFFFFFFF),
    }
    for what, data in cases.items():
        with pytest.raises(FormatError):
            rafs.build_index(data)
            pytest.fail(what)


def test_chunk_and_xattr_errors(boot: bytes) -> None:
    file5 = _record(boot, 5)
    name = struct.unpack_from("<H", boot, file5 + 100)[0]
    chunk = file5 + 128 + (name + 7) // 8 * 8
    cases = {
        "chunk count": _patch(boot, file5 + 96, "<I", 2),
        "absurd chunk count": _patch(boot, file5 + 96, "<I", 0xFFFFFFFF),
        "blob index": _patch(boot, chunk + 32, "<I", 1),
        "file offset": _patch(boot, chunk + 64, "<Q", 4096),
        "chunk size": _patch(boot, chunk + 44, "<I", 900),
        "blob range": _patch(boot, chunk + 48, "<Q", 1 << 40),
        "batch chunk": _patch(boot, chunk + 36, "<I", rafs.CHUNK_BATCH),
        "xattr flag": _patch(boot, file5 + 80, "<Q", rafs_v5.INODE_FLAG_XATTR),
    }
    for what, data in cases.items():
        with pytest.raises(FormatError):
            rafs.build_index(data)
            pytest.fail(what)


def test_xattr_table_errors() -> None:
    image = write_v5([Spec("f", "reg", xattrs={"user.a": b"b"})])
    boot = image.bootstrap
    at = boot.index(b"user.a") - 4 - 8  # the xattr table's u64 size
    for value, what in [(1 << 40, "size"), (3, "truncated pair")]:
        with pytest.raises(FormatError):
            rafs.build_index(_patch(boot, at, "<Q", value))
            pytest.fail(what)
    with pytest.raises(FormatError, match="longer"):
        rafs.build_index(_patch(boot, at + 8, "<I", 200))
    with pytest.raises(FormatError, match="without a name"):
        rafs.build_index(_patch(boot, at + 12, "<B", 0))


def test_blob_table_errors(boot: bytes) -> None:
    for bad_id in (b"/" * 64, b" " * 64, b".." + b"\0" * 62):
        with pytest.raises(FormatError, match="blob id"):
            rafs.build_index(boot[:8416] + bad_id + boot[8480:])
    with pytest.raises(FormatError, match="extended blob table is shorter"):
        rafs.build_index(boot[:8416] + b"a" * 20 + b"\0" + bytes(8) + b"b" * 35 + boot[8480:])


def test_budget_stops_overlapping_records() -> None:
    """Every inode-table entry pointing at one big record cannot blow up the work done."""
    image = write_v5([Spec(f"f{i}", "reg", data=bytes([i]) * 4096 * 3) for i in range(40)])
    boot = bytearray(image.bootstrap)
    entries = struct.unpack_from("<I", boot, 56)[0]
    first_file = struct.unpack_from("<I", boot, 8192 + 4)[0]
    for i in range(1, entries):
        struct.pack_into("<I", boot, 8192 + 4 * i, first_file)
    with pytest.raises(FormatError):
        rafs.build_index(bytes(boot))
