"""EROFS decoders (``formats/erofs.py``) cross-checked against images made by mkfs.erofs.

A source tree with every file type, hard links, user/trusted/security xattrs (some shared),
a directory spanning several blocks and files with sub-second mtimes is turned into an
EROFS image by erofs-utils' ``mkfs.erofs`` (flat, chunk-based with a block map, and
chunk-based on an extra blob device); ``erofs.walk`` must reproduce what ``os.lstat`` and
``os.getxattr`` say about the source, and every regular file's bytes. Then hand-made
corruptions must raise FormatError. erofs-utils is a test dependency (scripts/install-deps.sh).
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from snapshotter.errdefs import FormatError
from snapshotter.formats import erofs


def _make_source(root: Path) -> None:
    (root / "d1" / "d2").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "d1" / "big").write_bytes(os.urandom(3 * 4096 + 123))
    (root / "d1" / "tail").write_bytes(b"x" * 5000)
    os.link(root / "a.txt", root / "d1" / "hard")
    os.symlink("../a.txt", root / "d1" / "link")
    os.symlink("t" * 300, root / "longlink")
    os.mkfifo(root / "fifo")
    os.mknod(root / "cdev", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "bdev", 0o640 | stat.S_IFBLK, os.makedev(259, 300))
    for i in range(300):  # several directory blocks
        (root / "d1" / "d2" / f"file_with_a_rather_long_name_{i:04d}").touch()
    os.setxattr(root / "a.txt", "user.foo", b"bar")
    os.setxattr(root / "a.txt", "user.shared", b"same")
    os.setxattr(root / "d1" / "big", "user.shared", b"same")
    os.setxattr(root / "d1" / "big", "security.x", b"1")
    os.setxattr(root / "d1", "trusted.overlay.opaque", b"y")
    os.chown(root / "d1" / "tail", 70000, 12, follow_symlinks=False)
    os.chmod(root / "d1" / "tail", 0o4751)
    os.utime(root / "a.txt", ns=(0, 981173106_123456789))


def _mkfs(out: Path, src: Path, *extra: str) -> None:
    res = subprocess.run(["mkfs.erofs", "--preserve-mtime", *extra, str(out), str(src)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"mkfs.erofs failed (is erofs-utils installed?): {res.stderr}"


def _file_bytes(image: bytes, sb: erofs.SuperBlock, inode: erofs.Inode, blob: bytes) -> bytes:
    if inode.layout != erofs.LAYOUT_CHUNK_BASED:
        return erofs.inode_data(image, sb, inode)
    indexes, bits = erofs.chunk_format(inode)
    count = erofs.chunk_count(inode, sb)
    chunk = sb.block_size << bits
    if indexes:
        addrs = [(c.device_id, c.blkaddr) for c in erofs.parse_chunk_indexes(image, inode, count)]
    else:
        addrs = [(0, a) for a in erofs.parse_block_map(image, inode, count)]
    out = b"".join((blob if dev else image)[a * sb.block_size : a * sb.block_size + chunk]
                   for dev, a in addrs)
    return out[: inode.size]


def _check_image(image: bytes, src: Path, blob: bytes = b"") -> None:
    sb = erofs.parse_superblock(image)
    paths: dict[bytes, erofs.Entry] = {}
    for entry in erofs.walk(image, sb):
        parent = b"" if entry.parent is None else next(
            p for p, e in paths.items() if e.inode.nid == entry.parent and e.inode.is_dir)
        paths[(parent + b"/" + entry.name).lstrip(b"/") if entry.name else b""] = entry
    seen = {b""}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            seen.add(os.fsencode(full.relative_to(src)))
    assert set(paths) == seen
    for rel, entry in paths.items():
        full, inode = src / os.fsdecode(rel), entry.inode
        st = os.lstat(full)
        assert inode.mode == st.st_mode, rel
        assert (inode.uid, inode.gid) == (st.st_uid, st.st_gid), rel
        assert inode.mtime * 10**9 + inode.mtime_nsec == st.st_mtime_ns, rel
        if not stat.S_ISDIR(st.st_mode):
            assert inode.nlink == st.st_nlink, rel
        if stat.S_ISLNK(st.st_mode):
            assert erofs.inode_data(image, sb, inode) == os.fsencode(os.readlink(full))
        elif stat.S_ISREG(st.st_mode):
            assert _file_bytes(image, sb, inode, blob) == full.read_bytes(), rel
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            rdev = inode.i_u
            major, minor = (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
            assert (major, minor) == (os.major(st.st_rdev), os.minor(st.st_rdev))
        want = {k: os.getxattr(full, k, follow_symlinks=False)
                for k in os.listxattr(full, follow_symlinks=False)}
        assert erofs.parse_xattrs(image, sb, inode) == want, rel
    assert paths[b"a.txt"].inode.nid == paths[b"d1/hard"].inode.nid


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("erofs") / "src"
    root.mkdir()
    _make_source(root)
    return root


@pytest.mark.parametrize("extra", [[], ["-T0"], ["--chunksize=4096"], ["--chunksize=8192"]],
                         ids=["flat", "fixed-time", "chunk-4k", "chunk-8k"])
def test_mkfs_erofs_image_matches_source(source: Path, tmp_path: Path, extra: list[str]) -> None:
    img = tmp_path / "img"
    if "-T0" in extra:
        for dirpath, dirnames, filenames in os.walk(source):
            for name in dirnames + filenames:
                os.utime(Path(dirpath) / name, ns=(0, 0), follow_symlinks=False)
        os.utime(source, ns=(0, 0))
    _mkfs(img, source, *extra)
    _check_image(img.read_bytes(), source)


def test_mkfs_erofs_blob_device_chunk_indexes(source: Path, tmp_path: Path) -> None:
    img, blob = tmp_path / "img", tmp_path / "blob"
    _mkfs(img, source, "--chunksize=8192", f"--blobdev={blob}")
    image = img.read_bytes()
    sb = erofs.parse_superblock(image)
    assert sb.extra_devices == 1
    assert sb.feature_incompat & erofs.FEATURE_INCOMPAT_DEVICE_TABLE
    assert len(erofs.parse_device_table(image, sb)) == 1
    _check_image(image, source, blob.read_bytes())


# --- hand-made corruption ------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_image(source: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    img = tmp_path_factory.mktemp("flat") / "img"
    _mkfs(img, source)
    return img.read_bytes()


def _root(image: bytes) -> tuple[erofs.SuperBlock, erofs.Inode]:
    sb = erofs.parse_superblock(image)
    return sb, erofs.parse_inode(image, sb, sb.root_nid)


def test_superblock_errors(flat_image: bytes) -> None:
    with pytest.raises(FormatError, match="magic"):
        erofs.parse_superblock(flat_image[:1024] + b"\0" * 4 + flat_image[1028:])
    with pytest.raises(FormatError, match="outside"):
        erofs.parse_superblock(flat_image[:1100])
    bad = bytearray(flat_image)
    bad[1024 + 12] = 20
    with pytest.raises(FormatError, match="block size"):
        erofs.parse_superblock(bytes(bad))
    bad = bytearray(flat_image)
    struct.pack_into("<I", bad, 1024 + 80, 0x80)
    with pytest.raises(FormatError, match="incompat"):
        erofs.parse_superblock(bytes(bad))


def test_inode_errors(flat_image: bytes) -> None:
    sb, root = _root(flat_image)
    with pytest.raises(FormatError, match="outside"):
        erofs.parse_inode(flat_image, sb, len(flat_image))
    bad = bytearray(flat_image)
    struct.pack_into("<H", bad, root.offset, 0x7 << 1)
    with pytest.raises(FormatError, match="format"):
        erofs.parse_inode(bytes(bad), sb, sb.root_nid)


def test_dirent_errors() -> None:
    def block(*ents: tuple[int, int, int], names: bytes = b"") -> bytes:
        return b"".join(struct.pack("<QHBx", *e) for e in ents) + names

    assert [d.name for d in erofs.parse_dirents(block((1, 24, 2), (2, 25, 2), names=b"..."),
                                                4096)] == [b".", b".."]
    cases = [
        b"short",
        block((1, 13, 2), names=b"x"),  # nameoff not a multiple of 12
        block((1, 0, 2)),  # no entries
        block((1, 24, 2), (2, 23, 2), names=b"ab"),  # out of order
        block((1, 24, 2), (2, 24, 2), names=b"a"),  # empty name
        block((1, 12, 2), names=b"\0"),  # empty last name
        block((1, 12, 2), names=b"n" * 256),  # longer than 255
        block((1, 4000, 2), names=b"a"),  # first nameoff past the block
    ]
    for data in cases:
        with pytest.raises(FormatError):
            erofs.parse_dirents(data, 4096)


def test_xattr_and_inline_errors(flat_image: bytes) -> None:
    sb, root = _root(flat_image)
    fake = erofs.Inode(0, 0, False, erofs.LAYOUT_FLAT_INLINE, 3, 0o100644, 1, 4000, 0, 0,
                       0, 0, 0, 0)
    image = bytes(12) + struct.pack("<BBH", 1, 9, 0) + b"x" + bytes(4096)
    with pytest.raises(FormatError, match="index 9"):
        erofs.parse_xattrs(image, sb, erofs.Inode(**{**_fields(fake), "offset": -32}))
    with pytest.raises(FormatError, match="crosses"):
        erofs.inode_data(bytes(8192), sb, erofs.Inode(**{**_fields(fake), "offset": 4000}))
    with pytest.raises(FormatError, match="layout"):
        erofs.inode_data(bytes(8192), sb, erofs.Inode(**{**_fields(fake), "layout": 4}))
    with pytest.raises(FormatError, match="not chunk-based"):
        erofs.chunk_format(root)


def _fields(inode: erofs.Inode) -> dict[str, object]:
    return {f: getattr(inode, f) for f in erofs.Inode.__slots__}


def test_walk_rejects_a_directory_cycle(flat_image: bytes) -> None:
    sb, root = _root(flat_image)
    data = erofs.inode_data(flat_image, sb, root)
    d1 = next(e for e in erofs.parse_dirents(data, sb.block_size) if e.name == b"d1")
    d1_inode = erofs.parse_inode(flat_image, sb, d1.nid)
    d1_data_at = flat_image.index(erofs.inode_data(flat_image, sb, d1_inode))
    ents = erofs.parse_dirents(erofs.inode_data(flat_image, sb, d1_inode), sb.block_size)
    sub = next(i for i, e in enumerate(ents) if e.name == b"d2")
    bad = bytearray(flat_image)
    struct.pack_into("<Q", bad, d1_data_at + 12 * sub, sb.root_nid)  # d1/d2 -> root
    with pytest.raises(FormatError, match=r"\. / \.\.|reached twice"):
        list(erofs.walk(bytes(bad), sb))
    bad = bytearray(flat_image)
    struct.pack_into("<Q", bad, d1_data_at, d1.nid + 1)  # d1/. points elsewhere
    with pytest.raises(FormatError):
        list(erofs.walk(bytes(bad), sb))


def test_walk_rejects_type_mismatch_and_non_directory_root(flat_image: bytes) -> None:
    sb, root = _root(flat_image)
    data = erofs.inode_data(flat_image, sb, root)
    at = flat_image.index(data)
    ents = erofs.parse_dirents(data, sb.block_size)
    i = next(i for i, e in enumerate(ents) if e.name == b"a.txt")
    bad = bytearray(flat_image)
    bad[at + 12 * i + 10] = erofs.FT_DIR
    with pytest.raises(FormatError, match="file type"):
        list(erofs.walk(bytes(bad), sb))
    bad = bytearray(flat_image)
    struct.pack_into("<H", bad, 1024 + 14, ents[i].nid)  # root nid -> a file
    with pytest.raises(FormatError, match="not a directory"):
        list(erofs.walk(bytes(bad), erofs.parse_superblock(bytes(bad))))
