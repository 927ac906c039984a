"""Hostile RAFS v6 bootstraps (and the EROFS walk under them): FormatError, bounded memory.

Each case starts from a small valid bootstrap written by ``write_v6``, appends a region of
hand-made EROFS structures and points the root directory at new dirents naming them:
inodes packed 32 bytes apart whose xattr bodies cover each other, symlinks sharing one
data block, shared xattr ids naming overlapping 64 KiB entries, directories pointing back
at an ancestor, trees deeper than ``MAX_DEPTH``, files declaring 4 GiB of chunks, tables
declaring more than the bootstrap holds, and a file hard-linked under 20,000 names.
Memory is checked with ``tracemalloc`` (peak under 64 MiB); no test measures time.
"""

from __future__ import annotations

import struct

import pytest

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats import erofs, rafs
from snapshotter.formats.rafs import v6 as rafs_v6
from snapshotter.tools.convert.tree import Spec
from snapshotter.tools.convert.write_v6 import dir_blocks
from tests.memory import peak_under
from tests.unit.test_rafs_writer import write_v6

BS = 4096
S_IFREG, S_IFDIR, S_IFLNK = 0o100000, 0o040000, 0o120000
_COMPACT = struct.Struct("<HHHHIIIIHH4x")




def compact(mode: int, *, size: int = 0, layout: int = erofs.LAYOUT_FLAT_PLAIN,
            icount: int = 0, mtime: int = 0, i_u: int = 0, nlink: int = 1) -> bytes:
    """A 32-byte compact EROFS inode."""
    return _COMPACT.pack(layout << 1, icount, mode, nlink, size, mtime, i_u, 0, 0, 0)


def _align(n: int, unit: int = BS) -> int:
    return -(-n // unit) * unit


class Hostile:
    """A valid bootstrap plus an appended region; ``build`` repoints the root at dirents."""

    def __init__(self) -> None:
        self.base = write_v6([Spec("f", "reg", data=b"x")]).bootstrap
        self.sb = erofs.parse_superblock(self.base)
        self.meta = self.sb.meta_blkaddr * BS
        self.tail = bytearray()

    @property
    def end(self) -> int:
        """The absolute offset where the next appended bytes go."""
        return len(self.base) + len(self.tail)

    def put(self, data: bytes, align: int = BS) -> int:
        """Append ``data`` at the next multiple of ``align``; return its offset."""
        self.tail += bytes(_align(self.end, align) - self.end)
        at = self.end
        self.tail += data
        return at

    def nid(self, offset: int) -> int:
        """The nid of an inode at absolute ``offset`` (32-byte aligned, past meta_blkaddr)."""
        assert offset % 32 == 0 and offset >= self.meta
        return (offset - self.meta) // 32

    def dir_data(self, parent: int, me: int, entries: list[tuple[bytes, int, int]]) -> int:
        """Append a directory's dirent blocks; return the first block's address."""
        data = dir_blocks([(b".", me, 2), (b"..", parent, 2), *entries])
        return self.put(data) // BS

    def dir_inode(self, parent: int, me: int, entries: list[tuple[bytes, int, int]]) -> bytes:
        """A flat-plain directory inode whose dirents are appended now."""
        size = len(dir_blocks([(b".", me, 2), (b"..", parent, 2), *entries]))
        return compact(S_IFDIR | 0o755, size=size, i_u=self.dir_data(parent, me, entries),
                       nlink=2)

    def build(self, root_entries: list[tuple[bytes, int, int]]) -> bytes:
        """The bootstrap with the root directory replaced by ``root_entries``."""
        root = self.sb.root_nid
        block = self.dir_data(root, root, root_entries)
        size = len(dir_blocks([(b".", root, 2), (b"..", root, 2), *root_entries]))
        boot = bytearray(self.base + self.tail)
        boot += bytes(_align(len(boot)) - len(boot))
        at = self.meta + 32 * root
        boot[at : at + 32] = compact(S_IFDIR | 0o755, size=size, i_u=block, nlink=2)
        return bytes(boot)


def test_hostile_helper_builds_a_valid_bootstrap() -> None:
    h = Hostile()
    at = h.put(compact(S_IFREG | 0o644), 32)
    index = rafs.build_index(h.build([(b"empty", h.nid(at), 1)]))
    assert list(index.root.children) == ["empty"]


def test_overlapping_inodes_with_huge_xattr_bodies_exhaust_the_budget() -> None:
    """2000 inodes 32 bytes apart, each with a 256 KiB xattr body covering the next 8192
    slots, every word of which decodes as a valid xattr entry: unbounded, this is 16M
    entry decodes (and a 256 KiB copy per inode just to check its range)."""
    icount = 65529  # 4 * (icount - 1) is a multiple of 32: the entries end on the body's end
    # bytes 12..15 of each slot (i_mtime) read as an entry: name_len 0, index 1 ("user."),
    # value 28 bytes, so each entry is 32 bytes long and the next starts 32 bytes on;
    # mode 0o100400 makes byte 4 (the next body's shared-id count) zero
    mtime = int.from_bytes(b"\x00\x01\x1c\x00", "little")
    slot = compact(S_IFREG | 0o400, icount=icount, mtime=mtime)
    n = 2000
    h = Hostile()
    first = h.put(slot * (n + 8193), 32)
    boot = h.build([(b"f%05d" % i, h.nid(first + 32 * i), 1) for i in range(n)])
    with peak_under(), pytest.raises(LimitExceeded, match="budget"):
        rafs.build_index(boot)
    sb = erofs.parse_superblock(boot)
    with peak_under(), pytest.raises(LimitExceeded, match="budget"):
        list(erofs.walk(boot, sb))


def test_many_symlinks_sharing_one_target_block_exhaust_the_budget() -> None:
    """20,000 symlink inodes naming the same 4095-byte block: 80 MiB of targets unbounded."""
    h = Hostile()
    block = h.put(b"t" * erofs.MAX_SYMLINK) // BS
    n = 20_000
    first = h.put(compact(S_IFLNK | 0o777, size=erofs.MAX_SYMLINK, i_u=block) * n, 32)
    boot = h.build([(b"l%05d" % i, h.nid(first + 32 * i), 7) for i in range(n)])
    with peak_under(), pytest.raises(LimitExceeded, match="budget"):
        rafs.build_index(boot)


@pytest.mark.parametrize("size", [erofs.MAX_SYMLINK + 1, 0xFFFF_FFFF])
def test_symlink_declaring_a_huge_target_is_refused_before_reading(size: int) -> None:
    h = Hostile()
    at = h.put(compact(S_IFLNK | 0o777, size=size, i_u=0), 32)
    boot = h.build([(b"link", h.nid(at), 7)])
    with peak_under(4 << 20), pytest.raises(FormatError, match="target of"):
        rafs.build_index(boot)


def test_shared_xattr_ids_naming_overlapping_64k_entries_exhaust_the_budget() -> None:
    """500 inodes each naming 255 shared xattr ids, each id a different 64 KiB entry (the
    entries overlap: every word of the area decodes as one). Unbounded: 8 GiB copied."""
    h = Hostile()
    entries = h.put(b"\x00\x01\xff\xff" * (16_000 + 65_540 // 4), 4)
    first_xid = entries // 4  # xattr_blkaddr is 0 in RAFS v6: ids count from byte 0
    n, stride = 500, 1088
    body_size = 12 + 4 * 255
    region = bytearray()
    for k in range(n):
        ids = [first_xid + (k * 255 + j) % 16_000 for j in range(255)]
        body = struct.pack("<IB7x", 0, 255) + struct.pack("<255I", *ids)
        assert len(body) == body_size
        region += (compact(S_IFREG | 0o644, icount=256) + body).ljust(stride, b"\0")
    first = h.put(bytes(region), 32)
    boot = h.build([(b"x%04d" % k, h.nid(first + stride * k), 1) for k in range(n)])
    with peak_under(), pytest.raises(LimitExceeded, match="budget"):
        rafs.build_index(boot)


def test_shared_xattr_entry_named_by_many_inodes_is_decoded_once() -> None:
    """One 64 KiB shared entry named by 300 inodes: fine, and one bytes object for all."""
    h = Hostile()
    entry = h.put(struct.pack("<BBH", 1, 1, 0xFFFF) + b"a" + b"v" * 0xFFFF, 4)
    body = struct.pack("<IB7xI", 0, 1, entry // 4)
    n = 300
    first = h.put((compact(S_IFREG | 0o644, icount=2) + body).ljust(64, b"\0") * n, 32)
    boot = h.build([(b"x%04d" % k, h.nid(first + 64 * k), 1) for k in range(n)])
    index = rafs.build_index(boot)
    values = [node.xattrs["user.a"] for node in index.nodes.values() if node.xattrs]
    assert len(values) == n and len({id(v) for v in values}) == 1


@pytest.mark.parametrize("target", ["grandparent", "parent", "itself"])
def test_directory_pointing_back_at_an_ancestor_is_refused(target: str) -> None:
    """root/a/b where b lists an entry naming the root, a, or b under a new name."""
    h = Hostile()
    root = h.sb.root_nid
    a_at = h.put(bytes(64), 32)
    b_at = a_at + 32
    a, b = h.nid(a_at), h.nid(b_at)
    back = {"grandparent": root, "parent": a, "itself": b}[target]
    b_inode = h.dir_inode(a, b, [(b"back", back, 2)])
    a_inode = h.dir_inode(root, a, [(b"b", b, 2)])
    boot = bytearray(h.build([(b"a", a, 2)]))
    boot[a_at : a_at + 32], boot[b_at : b_at + 32] = a_inode, b_inode
    with peak_under(4 << 20), pytest.raises(FormatError, match="reached twice"):
        rafs.build_index(bytes(boot))


def test_directory_whose_dotdot_lies_is_refused() -> None:
    h = Hostile()
    a_at = h.put(bytes(32), 32)
    a = h.nid(a_at)
    a_inode = h.dir_inode(a, a, [])  # ".." names itself, not the root
    boot = bytearray(h.build([(b"a", a, 2)]))
    boot[a_at : a_at + 32] = a_inode
    with pytest.raises(FormatError, match=r"\. / \.\."):
        rafs.build_index(bytes(boot))


def test_tree_deeper_than_max_depth_is_refused_iteratively() -> None:
    specs = [Spec("/".join(["d"] * i), "dir", 0o755) for i in range(1, erofs.MAX_DEPTH + 2)]
    boot = write_v6(specs).bootstrap
    with peak_under(), pytest.raises(LimitExceeded, match="deeper than"):
        rafs.build_index(boot)
    ok = write_v6(specs[:-1]).bootstrap
    assert len(rafs.build_index(ok).nodes) == erofs.MAX_DEPTH + 1


@pytest.mark.parametrize("extended", [False, True])
def test_file_declaring_a_huge_size_is_refused_before_its_chunk_indexes(extended: bool) -> None:
    """A chunk-based file of 4 GiB (compact) or 2^60 bytes (extended): millions of chunk
    indexes declared, none there."""
    h = Hostile()
    fmt = erofs.CHUNK_FORMAT_INDEXES
    if extended:
        inode = struct.pack("<HHHHQIIIIQII16x", erofs.LAYOUT_CHUNK_BASED << 1 | 1, 0,
                            S_IFREG | 0o644, 0, 1 << 60, fmt, 0, 0, 0, 0, 0, 1)
    else:
        inode = compact(S_IFREG | 0o644, size=0xFFFF_FFFF, layout=erofs.LAYOUT_CHUNK_BASED,
                        i_u=fmt)
    at = h.put(inode, 32)
    boot = h.build([(b"big", h.nid(at), 1)])
    with peak_under(4 << 20), pytest.raises(FormatError, match="outside"):
        rafs.build_index(boot)


def test_one_file_hard_linked_under_20000_names_is_linear() -> None:
    h = Hostile()
    at = h.put(compact(S_IFREG | 0o644, nlink=20_000), 32)
    n = 20_000
    boot = h.build([(b"h%05d" % i, h.nid(at), 1) for i in range(n)])
    with peak_under():
        index = rafs.build_index(boot)
    (node,) = {index.nodes[ino].ino for ino in index.root.children.values()}
    assert index.nodes[node].nlink == n and len(index.root.children) == n


def test_chunk_table_declaring_more_than_the_bootstrap_is_refused() -> None:
    boot = bytearray(write_v6([Spec("f", "reg", data=b"x" * 5000)]).bootstrap)
    struct.pack_into("<Q", boot, rafs_v6.EXT_SUPERBLOCK_OFFSET + 32, 80 * (1 << 40))
    with peak_under(4 << 20), pytest.raises(FormatError, match="chunk table"):
        rafs.build_index(bytes(boot))


def test_prefetch_table_declaring_more_than_the_bootstrap_is_refused() -> None:
    boot = bytearray(write_v6([Spec("f", "reg", data=b"x")], prefetch=("f",)).bootstrap)
    struct.pack_into("<I", boot, rafs_v6.EXT_SUPERBLOCK_OFFSET + 48, 0xFFFF_FFFC)
    with peak_under(4 << 20), pytest.raises(FormatError, match="prefetch table"):
        rafs.build_index(bytes(boot))
