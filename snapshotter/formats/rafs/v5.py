"""RAFS v5 bootstraps (protocol-reference §5.5; nydus ``rafs/src/metadata/layout/v5.rs``).

Layout: an 8 KiB superblock (magic ``0x52414653``, version ``0x500``), then tables found
through it: the inode table (u32 per inode-table index, value = inode offset >> 3), the
blob table (``u32 readahead_offset, u32 readahead_size, blob id`` records separated by
NUL), the extended blob table (64-byte records: chunk count, sizes), the prefetch table
(u32 inode numbers). Each inode is a 128-byte record followed, each part padded to 8
bytes, by its name, its symlink target, its xattrs (``u64 size`` then ``u32 len, name,
NUL, value`` pairs) and, for regular files, ``i_child_count`` 80-byte chunk infos. A
directory's children are the inode-table indexes ``i_child_index ..
i_child_index + i_child_count - 1``; a hard link is a separate record carrying the same
``i_ino``. Inode numbers in the index are the RAFS ``i_ino`` values (root = 1).

``build_index`` raises FormatError for a malformed bootstrap; in particular an
inode-table index reached twice (a directory cycle or overlapping child ranges), a
directory reached under two names, records or tables past the end, names longer than
255 bytes, symlink targets longer than ``rafs.MAX_SYMLINK``, trees deeper than
``rafs.MAX_DEPTH``, chunk lists that do not tile the file (hole files are not
supported), and total work beyond what the bootstrap's size allows.

Bounds: every table's size (entries times record size) is checked against the
bootstrap by ``parse_superblock`` before it is read; a directory's child range must lie
in the inode table before it is walked, and every table index is visited at most once
(so neither a cycle nor a huge ``i_child_count`` can loop); a file's chunk count must
equal ``ceil(size / chunk size)`` and its chunk infos lie in the bootstrap before any is
decoded; every record, name, symlink target, xattr table and chunk-info list is charged
to a budget of twice the bootstrap's size before it is decoded, so records that overlap
cannot multiply the work. Hard links are separate records (each charged), and a second
name for an inode only links it. Memory and time are linear in the bootstrap's size.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats.index import ROOT_INO, Chunk, LayerIndex, Node, NodeKind
from snapshotter.formats.rafs import common as rafs
from snapshotter.formats.rafs.common import BlobInfo, check_range, ints, unpack

SUPERBLOCK_SIZE = 8192
MAGIC = 0x52414653
VERSION = 0x500
ALIGN = 8
INODE_SIZE = 128
CHUNK_INFO_SIZE = rafs.CHUNK_INFO.size
EXT_BLOB_ENTRY_SIZE = 64
MAX_NAME = 255
INODE_FLAG_SYMLINK = 0x1
INODE_FLAG_HARDLINK = 0x2
INODE_FLAG_XATTR = 0x4
INODE_FLAG_HAS_HOLE = 0x8

_SUPERBLOCK = struct.Struct("<IIIIQQQQQIIIIQ")  # the first 80 bytes; the rest is reserved
_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EXT_BLOB = struct.Struct("<IIQQ40x")


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


@dataclass(frozen=True, slots=True)
class SuperBlock:
    """The meaningful fields of ``RafsV5SuperBlock`` (``block_size`` is the chunk size)."""

    magic: int
    fs_version: int
    sb_size: int
    block_size: int
    flags: int
    inodes_count: int
    inode_table_offset: int
    prefetch_table_offset: int
    blob_table_offset: int
    inode_table_entries: int
    prefetch_table_entries: int
    blob_table_size: int
    extended_blob_table_entries: int
    extended_blob_table_offset: int


def parse_superblock(boot: bytes) -> SuperBlock:
    """Decode and validate the superblock as nydus does (``RafsV5SuperBlock::validate``).

    Raises FormatError for a bad magic/version/size (a bootstrap is larger than the
    superblock and a multiple of 8 bytes, as nydusd requires), a chunk size that is not a power of
    two in 4 KiB..16 MiB, unknown flag bits, or tables that are misaligned, lie outside
    the bootstrap or overlap each other.
    """
    sb = SuperBlock(*ints(unpack(_SUPERBLOCK, boot, 0, "RAFS v5 superblock")))
    if sb.magic != MAGIC or sb.fs_version != VERSION:
        raise FormatError(f"not a RAFS v5 superblock (magic {sb.magic:#x}, "
                          f"version {sb.fs_version:#x})")
    if sb.sb_size != SUPERBLOCK_SIZE or len(boot) <= SUPERBLOCK_SIZE or len(boot) % ALIGN:
        raise FormatError(f"RAFS v5 superblock size {sb.sb_size} or bootstrap size {len(boot)} "
                          f"invalid (the bootstrap is a multiple of 8 bytes past the superblock)")
    size = sb.block_size
    if size & (size - 1) or not rafs.MIN_CHUNK_SIZE <= size <= rafs.MAX_CHUNK_SIZE:
        raise FormatError(f"invalid RAFS v5 chunk size {size:#x}")
    if sb.flags & ~rafs.KNOWN_FLAGS:
        raise FormatError(f"unknown RAFS superblock flags {sb.flags:#x}")
    if sb.inodes_count > sb.inode_table_entries:
        raise FormatError(f"{sb.inodes_count} inodes but {sb.inode_table_entries} table entries")
    tables = [
        ("inode table", sb.inode_table_offset, 4 * sb.inode_table_entries),
        ("blob table", sb.blob_table_offset, sb.blob_table_size),
        ("extended blob table", sb.extended_blob_table_offset,
         EXT_BLOB_ENTRY_SIZE * sb.extended_blob_table_entries),
        ("prefetch table", sb.prefetch_table_offset, 4 * sb.prefetch_table_entries),
    ]
    present = [t for i, t in enumerate(tables) if i < 2 or t[2]]
    for what, offset, length in present:
        if offset % ALIGN or (offset < SUPERBLOCK_SIZE and length):
            raise FormatError(f"RAFS v5 {what} offset {offset:#x} is misaligned or inside "
                              f"the superblock")
        check_range(offset, length, len(boot), f"RAFS v5 {what}")
    for i, (what, offset, length) in enumerate(present):
        for other, o_off, o_len in present[:i]:
            if offset < o_off + o_len and o_off < offset + length:
                raise FormatError(f"RAFS v5 {what} overlaps the {other}")
    return sb


def parse_blob_table(boot: bytes, sb: SuperBlock) -> list[BlobInfo]:
    """The blob table's records, with sizes from the extended blob table when present.

    Raises FormatError for an empty or non-ASCII blob id or an extended table shorter
    than the blob table.
    """
    data = boot[sb.blob_table_offset : sb.blob_table_offset + sb.blob_table_size]
    compression = rafs.compression_from_flags(sb.flags)
    digest = rafs.digest_from_flags(sb.flags)
    blobs: list[BlobInfo] = []
    pos = 0
    while len(data) - pos > 8:  # as nydus: a tail of padding shorter than a header ends it
        ra_offset, ra_size = struct.unpack_from("<II", data, pos)
        end = data.find(b"\0", pos + 8)
        end = len(data) if end < 0 else end
        blob_id = rafs.check_blob_id(data[pos + 8 : end], "RAFS v5 blob table")
        chunk_count = compressed = uncompressed = 0
        if sb.extended_blob_table_entries:
            if len(blobs) >= sb.extended_blob_table_entries:
                raise FormatError("RAFS v5 extended blob table is shorter than the blob table")
            off = sb.extended_blob_table_offset + EXT_BLOB_ENTRY_SIZE * len(blobs)
            chunk_count, _, uncompressed, compressed = ints(
                unpack(_EXT_BLOB, boot, off, "extended blob table entry"))
        blobs.append(BlobInfo(len(blobs), blob_id, compression, digest,
                              sb.block_size, chunk_count, compressed, uncompressed, 0,
                              ra_offset, ra_size))
        pos = end + 1
    return blobs


def parse_prefetch_table(boot: bytes, sb: SuperBlock) -> list[int]:
    """The inode numbers of the prefetch table (range already checked by the superblock)."""
    off, n = sb.prefetch_table_offset, sb.prefetch_table_entries
    return list(struct.unpack_from(f"<{n}I", boot, off)) if n else []


@dataclass(frozen=True, slots=True)
class Inode:
    """One ``RafsV5Inode`` record plus where it is and what follows it."""

    offset: int
    digest: bytes
    parent: int
    ino: int
    uid: int
    gid: int
    projid: int
    mode: int
    size: int
    blocks: int
    flags: int
    nlink: int
    child_index: int
    child_count: int
    name_size: int
    symlink_size: int
    rdev: int
    mtime_nsec: int
    mtime: int

    @property
    def name_offset(self) -> int:
        """Where the name starts (right after the 128-byte record)."""
        return self.offset + INODE_SIZE

    @property
    def symlink_offset(self) -> int:
        """Where the symlink target starts (after the name, padded to 8)."""
        return self.name_offset + _align(self.name_size)

    @property
    def xattr_offset(self) -> int:
        """Where the xattr table (or, without xattrs, the chunk infos) starts."""
        return self.symlink_offset + _align(self.symlink_size)


def parse_inode(boot: bytes, offset: int) -> Inode:
    """Decode the inode record at ``offset`` (FormatError if it runs past the end)."""
    digest, *rest = unpack(_INODE, boot, offset, "RAFS v5 inode")
    if not isinstance(digest, bytes):
        raise FormatError("internal: inode digest is not bytes")
    return Inode(offset, digest, *ints(tuple(rest)))


class _Reader:
    """Walks one bootstrap. ``budget`` caps the bytes of records decoded in total."""

    def __init__(self, boot: bytes) -> None:
        self.boot = boot
        self.sb = parse_superblock(boot)
        self.blobs = parse_blob_table(boot, self.sb)
        self.budget = 2 * len(boot)
        n, off = self.sb.inode_table_entries, self.sb.inode_table_offset
        self.table = struct.unpack_from(f"<{n}I", boot, off)

    def charge(self, nbytes: int, what: str) -> None:
        """Spend ``nbytes`` of the budget; LimitExceeded (a FormatError) once records
        overlap too much."""
        self.budget -= nbytes
        if self.budget < 0:
            raise LimitExceeded(f"{what}: RAFS v5 records overlap beyond what the "
                                f"bootstrap size allows")

    def inode_at(self, index: int) -> Inode:
        """The inode record for inode-table index ``index`` (1-based)."""
        if not 1 <= index <= len(self.table):
            raise FormatError(f"inode table index {index} outside 1..{len(self.table)}")
        offset = self.table[index - 1] << 3
        if offset <= SUPERBLOCK_SIZE:
            raise FormatError(f"inode table index {index} points into the superblock")
        self.charge(INODE_SIZE, "inode")
        inode = parse_inode(self.boot, offset)
        if not 1 <= inode.ino <= len(self.table):
            raise FormatError(f"inode number {inode.ino} outside 1..{len(self.table)}")
        if not 1 <= inode.name_size <= MAX_NAME + 1:
            raise FormatError(f"inode {inode.ino}: name size {inode.name_size} invalid")
        return inode

    def field(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``, range-checked and charged."""
        check_range(offset, length, len(self.boot), what)
        self.charge(length, what)
        return self.boot[offset : offset + length]

    def xattrs(self, inode: Inode) -> tuple[dict[str, bytes], int]:
        """The inode's xattrs and the offset just past them."""
        off = inode.xattr_offset
        if not inode.flags & INODE_FLAG_XATTR:
            return {}, off
        (size,) = ints(unpack(_U64, self.boot, off, "xattr table size"))
        data = self.field(off + 8, size, f"inode {inode.ino} xattrs")
        out: dict[str, bytes] = {}
        pos = 0
        while pos < size:
            if pos + 4 > size:
                raise FormatError(f"inode {inode.ino}: truncated xattr pair")
            (pair,) = _U32.unpack_from(data, pos)
            body = data[pos + 4 : pos + 4 + pair]
            if len(body) != pair:
                raise FormatError(f"inode {inode.ino}: xattr pair longer than the table")
            key, sep, value = body.partition(b"\0")
            if not sep or not key:
                raise FormatError(f"inode {inode.ino}: xattr pair without a name")
            out[key.decode("utf-8", "surrogateescape")] = value
            pos += 4 + pair
        return out, off + 8 + _align(size)

    def chunks(self, inode: Inode, offset: int) -> list[Chunk]:
        """The file's chunks; they must tile ``[0, size)`` in order."""
        what = f"inode {inode.ino}"
        count, chunk_size = inode.child_count, self.sb.block_size
        if count != -(-inode.size // chunk_size):
            raise FormatError(f"{what}: {count} chunks for {inode.size} bytes (holes and "
                              f"chunk dictionaries are not supported)")
        check_range(offset, count * CHUNK_INFO_SIZE, len(self.boot), f"{what} chunk infos")
        self.charge(count * CHUNK_INFO_SIZE, what)
        out: list[Chunk] = []
        for i in range(count):
            info = rafs.parse_chunk_info(self.boot, offset + i * CHUNK_INFO_SIZE)
            pos = i * chunk_size
            if info.file_offset != pos:
                raise FormatError(f"{what}: chunk {i} at file offset {info.file_offset}, "
                                  f"expected {pos}")
            if info.blob_index >= len(self.blobs):
                raise FormatError(f"{what}: chunk names blob {info.blob_index} of "
                                  f"{len(self.blobs)}")
            size = min(chunk_size, inode.size - pos)
            out.append(rafs.make_chunk(info, self.blobs[info.blob_index], pos, size,
                                       f"{what} chunk {i}"))
        return out

    def node(self, inode: Inode, parent: int) -> Node | None:
        """The index node for a record seen for the first time (None for a socket)."""
        what = f"inode {inode.ino}"
        kind = rafs.kind_of(inode.mode, what)
        if kind is None:
            return None
        if inode.mtime_nsec >= 1_000_000_000:
            raise FormatError(f"{what}: mtime nanoseconds {inode.mtime_nsec} out of range")
        xattrs, after = self.xattrs(inode)
        node = Node(ino=inode.ino, kind=kind, mode=inode.mode & 0o7777, uid=inode.uid,
                    gid=inode.gid, mtime_ns=inode.mtime * 1_000_000_000 + inode.mtime_nsec,
                    size=inode.size, parent=parent, xattrs=xattrs)
        if kind is NodeKind.SYMLINK:
            if inode.symlink_size == 0:
                raise FormatError(f"{what}: symlink without a target")
            if inode.symlink_size > rafs.MAX_SYMLINK:
                raise FormatError(f"{what}: symlink target of {inode.symlink_size} bytes "
                                  f"(at most {rafs.MAX_SYMLINK})")
            node.link_target = self.field(inode.symlink_offset, inode.symlink_size, what)
            node.size = len(node.link_target)
        elif kind in (NodeKind.CHAR, NodeKind.BLOCK):
            node.rdev_major, node.rdev_minor = rafs.split_rdev(inode.rdev)
        elif kind is NodeKind.REG:
            node.chunks = self.chunks(inode, after)
        return node

    def name(self, inode: Inode) -> bytes:
        """The record's name (FormatError past the end or longer than 255 bytes)."""
        raw = self.field(inode.name_offset, inode.name_size, f"inode {inode.ino} name")
        if len(raw) > MAX_NAME:
            raise FormatError(f"inode {inode.ino}: name longer than {MAX_NAME} bytes")
        return raw


def build_index(boot: bytes) -> LayerIndex:
    """Parse a RAFS v5 bootstrap into a validated ``LayerIndex`` (format ``"rafs-v5"``).

    Raises FormatError as described in the module docstring.
    """
    reader = _Reader(boot)
    root = reader.inode_at(1)
    if root.ino != ROOT_INO or rafs.kind_of(root.mode, "root") is not NodeKind.DIR:
        raise FormatError("RAFS v5 inode table entry 1 is not the root directory")
    tree = rafs.TreeBuilder(rafs.RAFS_V5)
    root_node = reader.node(root, ROOT_INO)
    if root_node is None:
        raise FormatError("RAFS v5 root is not a directory")
    tree.add(root_node)
    seen = {1}
    queue = deque([root])
    while queue:
        parent = queue.popleft()
        first, count = parent.child_index, parent.child_count
        if count and (first < 1 or first + count - 1 > len(reader.table)):
            raise FormatError(f"directory inode {parent.ino}: children {first}..+{count} "
                              f"outside the inode table")
        for index in range(first, first + count):
            if index in seen:
                raise FormatError(f"inode table index {index} reached twice (directory cycle "
                                  f"or overlapping children)")
            seen.add(index)
            _add_child(reader, tree, parent, reader.inode_at(index), queue)
    return tree.finish(parse_prefetch_table(boot, reader.sb))


def _add_child(reader: _Reader, tree: rafs.TreeBuilder, parent: Inode, inode: Inode,
               queue: deque[Inode]) -> None:
    name = reader.name(inode)
    existing = tree.nodes.get(inode.ino)
    kind = rafs.kind_of(inode.mode, f"inode {inode.ino}")
    if existing is not None:
        if existing.kind is NodeKind.DIR or kind is NodeKind.DIR:
            raise FormatError(f"directory inode {inode.ino} reached twice")
        if existing.kind is not kind:
            raise FormatError(f"hard-linked inode {inode.ino} changes type")
        tree.link(parent.ino, name, inode.ino)
        return
    node = reader.node(inode, parent.ino)
    if node is None:
        return
    tree.add(node)
    tree.link(parent.ino, name, inode.ino)
    if node.kind is NodeKind.DIR:
        queue.append(inode)
