"""RAFS v6 bootstraps (protocol-reference §5.6; nydus ``rafs/src/metadata/layout/v6.rs``).

A RAFS v6 bootstrap is an EROFS image (parsed by ``erofs.py``) with nydus extensions:
the RAFS extended superblock (256 bytes at 1152), the device table at 1408 (one slot per
data blob), the blob table (256-byte ``RafsV6Blob`` records), the chunk table (80-byte
``RafsV5ChunkInfo`` records, one per distinct chunk) and the prefetch table (u32 nids).
Regular files are chunk-based inodes with one 8-byte chunk index per RAFS chunk
(``ceil(size / chunk_size)`` of them, whatever chunk size the EROFS chunk format claims):
the low byte of the index's second u16 is the device id (blob index + 1), its high byte
and the first u16 form the 24-bit chunk id within that blob, and the u32 is the chunk's
uncompressed block address. The chunk table entry with the same (blob, chunk id, block
address) gives the digest and the compressed range, as nydusd's chunk map does.

Inode numbers: the root is 1, any other inode is its nid + 2 (nids are unique per inode;
a hard link is one nid under several names), so the numbering is a pure function of the
bootstrap.

``build_index`` raises FormatError for a superblock nydus would refuse (checksum, block
size, features, table placement), blobs or chunks it cannot serve here (encrypted,
batch, zran, tarfs, holes), a chunk missing from the chunk table, a symlink target over
``erofs.MAX_SYMLINK`` bytes, and every structural error ``erofs.walk`` reports (cycles,
trees deeper than ``erofs.MAX_DEPTH``, truncation, bad dirents).

Bounds: the tables are range-checked by the superblock checks before they are read
(at most ``MAX_BLOBS`` blobs; the chunk table's entries are at most its size / 80). One
``erofs.Budget`` of twice the bootstrap's size is charged with every inode, directory,
symlink target, shared xattr entry and chunk-index table before it is decoded, so
structures that overlap (which nydus-image never writes) cannot multiply the work: time
and memory are linear in the bootstrap's size, whatever sizes and counts it declares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snapshotter.errdefs import FormatError
from snapshotter.formats import erofs
from snapshotter.formats.index import ROOT_INO, Chunk, LayerIndex, Node, NodeKind
from snapshotter.formats.rafs import common as rafs
from snapshotter.formats.rafs.common import BlobInfo, ChunkInfo, check_range, ints, unpack

EXT_SUPERBLOCK_OFFSET = 1152
EXT_SUPERBLOCK_SIZE = 256
DEVTABLE_OFFSET = 1408
BLOB_ENTRY_SIZE = 256
CHUNK_INFO_SIZE = rafs.CHUNK_INFO.size
CHUNK_INDEX_SIZE = 8
COMPAT_RAFS_V6 = 0x4000_0000
INCOMPAT_RAFS_V6 = erofs.FEATURE_INCOMPAT_CHUNKED_FILE | erofs.FEATURE_INCOMPAT_DEVICE_TABLE
MAX_BLOBS = 254
MAX_CHUNKS_PER_BLOB = 1 << 24
META_ALIGN = 4096
# BlobFeatures this reader cannot serve.
BLOB_ZRAN = 0x8
BLOB_TARFS = 0x40
BLOB_BATCH = 0x80
BLOB_ENCRYPTED = 0x100

_EXT = struct.Struct("<QQIIQQQI4x200x")
_BLOB = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQ8sI36x")


@dataclass(frozen=True, slots=True)
class ExtSuperBlock:
    """``RafsV6SuperBlockExt``: RAFS flags and where the nydus tables are."""

    flags: int
    blob_table_offset: int
    blob_table_size: int
    chunk_size: int
    chunk_table_offset: int
    chunk_table_size: int
    prefetch_table_offset: int
    prefetch_table_size: int


def _check_erofs(boot: bytes, sb: erofs.SuperBlock) -> None:
    """The checks of nydus ``RafsV6SuperBlock::validate``."""
    bs = sb.block_size
    problems = [
        (sb.blkszbits not in (9, 12), f"block size bits {sb.blkszbits}"),
        (len(boot) < META_ALIGN or len(boot) % bs, f"bootstrap size {len(boot)}"),
        (sb.meta_blkaddr * bs > len(boot), f"meta block address {sb.meta_blkaddr}"),
        (sb.checksum != 0, f"checksum {sb.checksum:#x}"),
        (sb.sb_extslots != 0, f"extended slots {sb.sb_extslots}"),
        (sb.inos == 0, "zero inode count"),
        (sb.u1 != 0, f"union field {sb.u1:#x}"),
        (sb.xattr_blkaddr != 0, "shared xattr area"),
        (sb.extra_devices == 0 and sb.blocks not in (0, 4096), f"blocks {sb.blocks}"),
        (sb.devt_slotoff * erofs.DEVICE_SLOT_SIZE != DEVTABLE_OFFSET,
         f"device table slot offset {sb.devt_slotoff}"),
        (sb.feature_incompat != INCOMPAT_RAFS_V6, f"incompat features {sb.feature_incompat:#x}"),
        (not sb.feature_compat & COMPAT_RAFS_V6, f"compat features {sb.feature_compat:#x}"),
        (sb.extra_devices > MAX_BLOBS, f"{sb.extra_devices} devices"),
    ]
    for bad, what in problems:
        if bad:
            raise FormatError(f"invalid RAFS v6 superblock: {what}")


def _check_ext(boot: bytes, sb: erofs.SuperBlock, ext: ExtSuperBlock) -> None:
    """The checks of nydus ``RafsV6SuperBlockExt::validate``, plus unsupported modes."""
    compression = ext.flags & (rafs.FLAG_COMPRESSION_NONE | rafs.FLAG_COMPRESSION_LZ4
                               | rafs.FLAG_COMPRESSION_GZIP | rafs.FLAG_COMPRESSION_ZSTD)
    digest = ext.flags & (rafs.FLAG_HASH_BLAKE3 | rafs.FLAG_HASH_SHA256)
    if compression.bit_count() != 1 or digest.bit_count() != 1 or ext.flags & ~rafs.KNOWN_FLAGS:
        raise FormatError(f"invalid RAFS v6 flags {ext.flags:#x}")
    if ext.flags & (rafs.FLAG_TARFS_MODE | rafs.FLAG_ENCRYPTION_AES_128_XTS):
        raise FormatError("RAFS v6 tarfs mode and encryption are not supported")
    cs = ext.chunk_size
    if cs & (cs - 1) or not rafs.MIN_CHUNK_SIZE <= cs <= rafs.MAX_CHUNK_SIZE:
        raise FormatError(f"invalid RAFS v6 chunk size {cs:#x}")
    floor = max(META_ALIGN, DEVTABLE_OFFSET + erofs.DEVICE_SLOT_SIZE * sb.extra_devices)
    tables = [("blob table", ext.blob_table_offset, ext.blob_table_size, BLOB_ENTRY_SIZE, True)]
    if ext.chunk_table_size:
        tables.append(("chunk table", ext.chunk_table_offset, ext.chunk_table_size,
                       CHUNK_INFO_SIZE, True))
    if ext.prefetch_table_size and ext.prefetch_table_offset:
        tables.append(("prefetch table", ext.prefetch_table_offset, ext.prefetch_table_size,
                       4, False))
    for i, (what, off, size, unit, aligned) in enumerate(tables):
        if off < floor or size % unit or (aligned and off % META_ALIGN):
            raise FormatError(f"invalid RAFS v6 {what} offset {off:#x} / size {size:#x}")
        check_range(off, size, len(boot), f"RAFS v6 {what}")
        for other, o_off, o_size, _, _ in tables[:i]:
            if off < o_off + o_size and o_off < off + size:
                raise FormatError(f"RAFS v6 {what} overlaps the {other}")


def parse_superblocks(boot: bytes) -> tuple[erofs.SuperBlock, ExtSuperBlock]:
    """Decode and validate the EROFS superblock and the RAFS extended superblock.

    Raises FormatError for anything nydus would refuse (see ``_check_erofs``/``_check_ext``)
    and for tarfs or encrypted bootstraps, which this reader does not serve.
    """
    sb = erofs.parse_superblock(boot)
    _check_erofs(boot, sb)
    ext = ExtSuperBlock(*ints(unpack(_EXT, boot, EXT_SUPERBLOCK_OFFSET, "RAFS v6 ext superblock")))
    _check_ext(boot, sb, ext)
    return sb, ext


def _blob_entry(boot: bytes, offset: int, index: int, ext: ExtSuperBlock) -> BlobInfo:
    raw = unpack(_BLOB, boot, offset, "RAFS v6 blob entry")
    blob_id = rafs.check_blob_id(bytes(raw[0]).rstrip(b"\0") if isinstance(raw[0], bytes)
                                 else b"", "RAFS v6 blob table")
    (blob_index, chunk_size, chunk_count, comp, dig, features, compressed, uncompressed,
     _, ci_comp) = ints(raw[1:11])
    (cipher,) = ints(raw[18:19])
    what = f"RAFS v6 blob {index} ({blob_id})"
    if blob_index != index or chunk_size != ext.chunk_size:
        raise FormatError(f"{what}: index {blob_index} / chunk size {chunk_size:#x} mismatch")
    if comp not in rafs.COMPRESSION_BY_ALGO or dig not in rafs.DIGEST_BY_ALGO \
            or ci_comp not in rafs.COMPRESSION_BY_ALGO or chunk_count > MAX_CHUNKS_PER_BLOB:
        raise FormatError(f"{what}: invalid algorithm or chunk count")
    if cipher or features & (BLOB_ZRAN | BLOB_TARFS | BLOB_BATCH | BLOB_ENCRYPTED):
        raise FormatError(f"{what}: zran, tarfs, batch and encrypted blobs are not supported "
                          f"(features {features:#x}, cipher {cipher})")
    if uncompressed > 1 << 44 or compressed > 1 << 40:
        raise FormatError(f"{what}: absurd blob size")
    return BlobInfo(index, blob_id, rafs.COMPRESSION_BY_ALGO[comp], rafs.DIGEST_BY_ALGO[dig],
                    chunk_size, chunk_count, compressed, uncompressed, features)


def parse_blob_table(boot: bytes, sb: erofs.SuperBlock, ext: ExtSuperBlock) -> list[BlobInfo]:
    """The blob table, checked against the device table (one slot per blob, same ids).

    Raises FormatError for invalid entries (``_blob_entry``), or a device table whose size
    or blob ids differ from the blob table's (nydus-image writes slot i for blob i).
    """
    count = ext.blob_table_size // BLOB_ENTRY_SIZE
    if count > MAX_BLOBS or count != sb.extra_devices:
        raise FormatError(f"RAFS v6 has {count} blobs but {sb.extra_devices} devices")
    blobs = [_blob_entry(boot, ext.blob_table_offset + i * BLOB_ENTRY_SIZE, i, ext)
             for i in range(count)]
    for blob, device in zip(blobs, erofs.parse_device_table(boot, sb), strict=True):
        if device.tag != blob.blob_id.encode():
            raise FormatError(f"RAFS v6 device slot {blob.index} names {device.tag[:64]!r}, "
                              f"the blob table {blob.blob_id}")
    return blobs


def parse_chunk_table(boot: bytes, sb: erofs.SuperBlock,
                      ext: ExtSuperBlock) -> dict[tuple[int, int, int], ChunkInfo]:
    """The chunk table keyed like nydusd's chunk map: (device id, chunk id, block address)."""
    out: dict[tuple[int, int, int], ChunkInfo] = {}
    for i in range(ext.chunk_table_size // CHUNK_INFO_SIZE):
        info = rafs.parse_chunk_info(boot, ext.chunk_table_offset + i * CHUNK_INFO_SIZE)
        out[(info.blob_index + 1, info.index, info.uncompressed_offset // sb.block_size)] = info
    return out


def parse_prefetch_table(boot: bytes, ext: ExtSuperBlock) -> list[int]:
    """The nids of the prefetch table (empty when it has no offset, as in legacy images)."""
    if not ext.prefetch_table_size or not ext.prefetch_table_offset:
        return []
    n = ext.prefetch_table_size // 4
    return list(struct.unpack_from(f"<{n}I", boot, ext.prefetch_table_offset))


def ino_of(nid: int, root_nid: int) -> int:
    """The index inode number of EROFS inode ``nid`` (root 1, others nid + 2)."""
    return ROOT_INO if nid == root_nid else nid + 2


class _Builder:
    """Turns ``erofs.walk`` entries into index nodes.

    ``budget`` (``erofs.Budget.for_image``) is shared by the walk and every decoder this
    class calls; ``xattrs`` decodes each shared xattr entry once.
    """

    def __init__(self, boot: bytes) -> None:
        self.boot = boot
        self.sb, self.ext = parse_superblocks(boot)
        self.blobs = parse_blob_table(boot, self.sb, self.ext)
        self.chunk_table = parse_chunk_table(boot, self.sb, self.ext)
        self.budget = erofs.Budget.for_image(boot)
        self.xattrs = erofs.XattrCache(self.budget)
        self.tree = rafs.TreeBuilder(rafs.RAFS_V6)

    def chunks(self, inode: erofs.Inode, what: str) -> list[Chunk]:
        """The file's chunks from its chunk indexes and the chunk table (FormatError if bad).

        The count comes from the size and the RAFS chunk size; the index table must lie
        in the bootstrap and is charged to the budget before it is decoded.
        """
        if inode.size == 0:
            return []
        chunk_size = self.ext.chunk_size
        count = -(-inode.size // chunk_size)
        out = []
        indexes = erofs.parse_chunk_indexes(self.boot, inode, count, self.budget)
        for i, index in enumerate(indexes):
            if index.blkaddr == erofs.NULL_ADDR:
                raise FormatError(f"{what}: hole chunks are not supported")
            device = index.device_id & 0xFF
            chunk_id = (index.device_id >> 8) << 16 | index.advise
            if not 1 <= device <= len(self.blobs):
                raise FormatError(f"{what}: chunk {i} names device {device} of {len(self.blobs)}")
            info = self.chunk_table.get((device, chunk_id, index.blkaddr))
            if info is None:
                raise FormatError(f"{what}: chunk {i} (blob {device - 1}, id {chunk_id}) is "
                                  f"not in the chunk table")
            pos = i * chunk_size
            out.append(rafs.make_chunk(info, self.blobs[device - 1], pos,
                                       min(chunk_size, inode.size - pos), f"{what} chunk {i}"))
        return out

    def node(self, inode: erofs.Inode, ino: int, parent: int) -> Node | None:
        """The index node for an inode seen for the first time (None for a socket)."""
        what = f"RAFS v6 inode nid {inode.nid}"
        kind = rafs.kind_of(inode.mode, what)
        if kind is None:
            return None
        node = Node(ino=ino, kind=kind, mode=inode.mode & 0o7777, uid=inode.uid,
                    gid=inode.gid, mtime_ns=inode.mtime * 1_000_000_000 + inode.mtime_nsec,
                    size=inode.size, parent=parent,
                    xattrs=erofs.parse_xattrs(self.boot, self.sb, inode, self.xattrs))
        if kind is NodeKind.SYMLINK:
            node.link_target = erofs.symlink_target(self.boot, self.sb, inode, self.budget)
        elif kind in (NodeKind.CHAR, NodeKind.BLOCK):
            node.rdev_major, node.rdev_minor = rafs.split_rdev(inode.i_u)
        elif kind is NodeKind.REG:
            node.chunks = self.chunks(inode, what)
        return node

    def add(self, entry: erofs.Entry) -> None:
        """Add one name from ``erofs.walk`` (a new node, or a hard link to a known one)."""
        root = self.sb.root_nid
        ino = ino_of(entry.inode.nid, root)
        if entry.parent is None:
            node = self.node(entry.inode, ino, ROOT_INO)
            if node is None:
                raise FormatError("RAFS v6 root is not a directory")
            self.tree.add(node)
            return
        parent = ino_of(entry.parent, root)
        if ino not in self.tree.nodes:
            node = self.node(entry.inode, ino, parent)
            if node is None:
                return
            self.tree.add(node)
        self.tree.link(parent, entry.name, ino)


def build_index(boot: bytes) -> LayerIndex:
    """Parse a RAFS v6 bootstrap into a validated ``LayerIndex`` (format ``"rafs-v6"``).

    Raises FormatError as described in the module docstring.
    """
    builder = _Builder(boot)
    for entry in erofs.walk(boot, builder.sb, builder.budget):
        builder.add(entry)
    root = builder.sb.root_nid
    prefetch = [ino_of(nid, root) for nid in parse_prefetch_table(boot, builder.ext)]
    return builder.tree.finish(prefetch)
