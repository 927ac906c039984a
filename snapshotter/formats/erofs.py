"""EROFS on-disk structures (protocol-reference §6; erofs-utils ``include/erofs_fs.h``).

Pure, bounds-checked decoders over a whole image held in memory: the superblock at byte
1024, compact (32-byte) and extended (64-byte) inodes addressed by nid
(``meta_blkaddr * block_size + nid * 32``), flat directory data and its dirents, inline
and shared xattrs, chunk-based files (8-byte chunk indexes or a 4-byte block map) and
the device table. ``walk`` visits a whole tree breadth first.

A RAFS v6 bootstrap is an EROFS image (``rafs_v6`` adds the nydus extensions); images
made by ``mkfs.erofs`` parse too, except for compressed files and the 48-bit/metabox
layouts, which are reported as unsupported. Everything raises only FormatError.

Bounds. Every offset, size and count is range-checked against the image before it is
used. Nothing stops a hostile image from making structures overlap (inodes 32 bytes
apart whose xattr bodies cover each other, many symlinks or shared xattr ids naming the
same bytes), which would let a small image make the parser decode the same bytes over
and over. In a well-formed image those structures are disjoint, so a ``Budget`` of
``BUDGET_FACTOR`` times the image size caps the bytes decoded in total: ``walk`` charges
every inode (core and xattr body) and directory's data, and the decoders charge what
they copy when given the walk's budget (``rafs_v6`` passes one budget to all of them).
Shared xattr entries are decoded once per id (``XattrCache``). Symlink targets are at
most ``MAX_SYMLINK`` bytes and trees at most ``MAX_DEPTH`` directories deep; the walk is
iterative. Work and memory are therefore linear in the image size, provided a caller
that decodes many inodes passes one ``Budget`` (the walk's) to ``inode_data``,
``symlink_target``, ``parse_chunk_indexes``/``parse_block_map`` and one ``XattrCache``
to ``parse_xattrs``: each call alone is bounded by the image size, not the sum of calls.

Inode times: an extended inode has its own mtime; a compact one uses the superblock's
``build_time``/``build_time_nsec`` plus the u32 at inode offset 12 (``i_mtime`` in
current EROFS, zero in older images), as the kernel does.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from snapshotter.errdefs import FormatError, LimitExceeded

SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
SUPERBLOCK_SIZE = 128
SLOT_SIZE = 32
COMPACT_SIZE = 32
EXTENDED_SIZE = 64
DIRENT_SIZE = 12
DEVICE_SLOT_SIZE = 128
XATTR_HEADER_SIZE = 12
XATTR_ENTRY_SIZE = 4
MAX_NAME = 255
NULL_ADDR = 0xFFFFFFFF
# Linux refuses symlink targets of PATH_MAX (4096) bytes or more, and the EROFS kernel
# driver cuts a longer one to 4095 bytes, so no image legitimately holds a longer target.
MAX_SYMLINK = 4095
# Deepest directory nesting accepted (the root is depth 0). A path the kernel resolves
# is at most PATH_MAX (4096) bytes, so at most 2048 levels ("a/" repeated) are reachable
# from the root through one path; twice that leaves room for trees walked by relative
# lookups while keeping consumers that build paths (tree listings, messages) linear.
MAX_DEPTH = 4096
# ``Budget`` allowance per image byte: legitimate structures are disjoint, so their total
# is at most the image size; the factor only leaves slack.
BUDGET_FACTOR = 2

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20

FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
FEATURE_INCOMPAT_XATTR_PREFIXES = 0x40
_UNSUPPORTED_INCOMPAT = ~0x7F & 0xFFFFFFFF  # 48BIT (0x80), METABOX (0x100) and later

FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
_FT_BY_FMT = {0o100000: FT_REG, 0o040000: FT_DIR, 0o020000: FT_CHR, 0o060000: FT_BLK,
              0o010000: FT_FIFO, 0o140000: FT_SOCK, 0o120000: FT_SYMLINK}
S_IFDIR = 0o040000

XATTR_PREFIXES = {
    1: "user.",
    2: "system.posix_acl_access",
    3: "system.posix_acl_default",
    4: "trusted.",
    5: "lustre.",
    6: "security.",
}

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHH")
_COMPACT = struct.Struct("<HHHHIIIIHH4x")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
_DIRENT = struct.Struct("<QHBx")
_XATTR_ENTRY = struct.Struct("<BBH")
_CHUNK_INDEX = struct.Struct("<HHI")
_DEVICE = struct.Struct("<64sIIHH52x")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


class Budget:
    """Bytes an image may still make a parser decode; LimitExceeded once overdrawn.

    ``Budget.for_image(image)`` allows ``BUDGET_FACTOR * len(image)`` bytes. ``charge`` is
    called with the size of a structure *before* it is decoded or copied, so an image
    whose structures overlap is refused after linear work, never after quadratic work.
    """

    __slots__ = ("left",)

    def __init__(self, total: int) -> None:
        self.left = total

    @classmethod
    def for_image(cls, image: bytes) -> Budget:
        """A budget of ``BUDGET_FACTOR`` times the image size."""
        return cls(BUDGET_FACTOR * len(image))

    def charge(self, nbytes: int, what: str) -> None:
        """Spend ``nbytes``; LimitExceeded (a FormatError) naming ``what`` when the
        budget is exhausted."""
        self.left -= nbytes
        if self.left < 0:
            raise LimitExceeded(f"{what}: the image's structures overlap beyond what its "
                              f"size allows (decoding budget exhausted)")


def _unpack(st: struct.Struct, image: bytes, offset: int, what: str) -> tuple[int | bytes, ...]:
    if offset < 0 or offset + st.size > len(image):
        raise FormatError(f"{what} at offset {offset} ({st.size} bytes) lies outside the "
                          f"{len(image)}-byte image")
    return st.unpack_from(image, offset)


def _ints(values: tuple[int | bytes, ...]) -> tuple[int, ...]:
    return tuple(v for v in values if isinstance(v, int))


def _check(image: bytes, offset: int, length: int, what: str) -> None:
    """FormatError unless ``[offset, offset + length)`` lies inside the image (no copy)."""
    if offset < 0 or length < 0 or offset + length > len(image):
        raise FormatError(f"{what} [{offset}, {offset + length}) lies outside the "
                          f"{len(image)}-byte image")


def _slice(image: bytes, offset: int, length: int, what: str,
           budget: Budget | None = None) -> bytes:
    """The range-checked bytes ``[offset, offset + length)``, charged to ``budget``."""
    _check(image, offset, length, what)
    if budget is not None:
        budget.charge(length, what)
    return image[offset : offset + length]


@dataclass(frozen=True, slots=True)
class SuperBlock:
    """The EROFS superblock fields up to ``devt_slotoff`` (the erofs-utils v1.5 subset)."""

    magic: int
    checksum: int
    feature_compat: int
    blkszbits: int
    sb_extslots: int
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: bytes
    feature_incompat: int
    u1: int
    extra_devices: int
    devt_slotoff: int

    @property
    def block_size(self) -> int:
        """``1 << blkszbits``."""
        return 1 << self.blkszbits

    def nid_offset(self, nid: int) -> int:
        """Byte offset of inode ``nid``."""
        return self.meta_blkaddr * self.block_size + nid * SLOT_SIZE


def parse_superblock(image: bytes) -> SuperBlock:
    """Decode the superblock at 1024; FormatError for a bad magic, block size or feature.

    Block sizes 512 B..64 KiB are accepted; incompat features this reader cannot follow
    (48-bit layout, metabox, and any later bit) are refused.
    """
    raw = _unpack(_SUPER, image, SUPER_OFFSET, "EROFS superblock")
    uuid, volume = raw[12], raw[13]
    if not isinstance(uuid, bytes) or not isinstance(volume, bytes):
        raise FormatError("internal: EROFS uuid is not bytes")
    fields: list[Any] = [*_ints(raw[:12]), uuid, volume, *_ints(raw[14:])]
    sb = SuperBlock(*fields)
    if sb.magic != MAGIC:
        raise FormatError(f"bad EROFS magic {sb.magic:#x} at offset {SUPER_OFFSET}")
    if not 9 <= sb.blkszbits <= 16:
        raise FormatError(f"unsupported EROFS block size bits {sb.blkszbits}")
    if sb.feature_incompat & _UNSUPPORTED_INCOMPAT:
        raise FormatError(f"unsupported EROFS incompat features {sb.feature_incompat:#x}")
    return sb


@dataclass(frozen=True, slots=True)
class Inode:
    """A decoded compact or extended inode (``mtime`` in seconds, ``mtime_nsec`` apart)."""

    nid: int
    offset: int
    extended: bool
    layout: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int

    @property
    def core_size(self) -> int:
        """32 for a compact inode, 64 for an extended one."""
        return EXTENDED_SIZE if self.extended else COMPACT_SIZE

    @property
    def xattr_size(self) -> int:
        """Bytes of inline xattrs after the inode core (``erofs_xattr_ibody_size``)."""
        if not self.xattr_icount:
            return 0
        return XATTR_HEADER_SIZE + XATTR_ENTRY_SIZE * (self.xattr_icount - 1)

    @property
    def is_dir(self) -> bool:
        """Whether the mode says directory."""
        return self.mode & 0o170000 == S_IFDIR

    @property
    def file_type(self) -> int:
        """The dirent file type (``FT_*``) matching ``mode``, FT_UNKNOWN if none does."""
        return _FT_BY_FMT.get(self.mode & 0o170000, FT_UNKNOWN)


def parse_inode(image: bytes, sb: SuperBlock, nid: int) -> Inode:
    """Decode inode ``nid``; FormatError if it lies outside the image or its format is bad."""
    offset = sb.nid_offset(nid)
    what = f"EROFS inode nid {nid}"
    (fmt,) = _ints(_unpack(_U16, image, offset, what))
    layout = fmt >> 1 & 0x7
    if fmt & ~0xF or layout > LAYOUT_CHUNK_BASED:
        raise FormatError(f"{what}: unsupported inode format {fmt:#x}")
    if fmt & 1:
        (_, icount, mode, _, size, i_u, ino, uid, gid, mtime, nsec,
         nlink) = _ints(_unpack(_EXTENDED, image, offset, what))
    else:
        (_, icount, mode, nlink, size, rel_mtime, i_u, ino, uid,
         gid) = _ints(_unpack(_COMPACT, image, offset, what))
        mtime, nsec = sb.build_time + rel_mtime, sb.build_time_nsec
    if nsec >= 1_000_000_000:
        raise FormatError(f"{what}: mtime nanoseconds {nsec} out of range")
    inode = Inode(nid, offset, bool(fmt & 1), layout, icount, mode, nlink, size, i_u, ino,
                  uid, gid, mtime, nsec)
    _check(image, offset, inode.core_size + inode.xattr_size, f"{what} with its xattrs")
    return inode


def inode_data(image: bytes, sb: SuperBlock, inode: Inode,
               budget: Budget | None = None) -> bytes:
    """The data of a flat (plain or inline) inode: a directory's dirents, a symlink target.

    Raises FormatError for other layouts, data outside the image, inline data crossing
    its block (EROFS keeps the inline tail in the inode's own block), or a ``budget``
    (charged with the size before anything is copied) that is exhausted.
    """
    bs, size = sb.block_size, inode.size
    what = f"EROFS inode nid {inode.nid} data"
    if inode.layout == LAYOUT_FLAT_PLAIN:
        return _slice(image, inode.i_u * bs, size, what, budget) if size else b""
    if inode.layout != LAYOUT_FLAT_INLINE:
        raise FormatError(f"{what}: unsupported layout {inode.layout} for inline data")
    if size == 0:
        return b""
    head = (-(-size // bs) - 1) * bs
    tail_off = inode.offset + inode.core_size + inode.xattr_size
    if tail_off % bs + (size - head) > bs:
        raise FormatError(f"{what}: inline tail crosses a block boundary")
    if head:
        _check(image, inode.i_u * bs, head, what)
    _check(image, tail_off, size - head, what)
    if budget is not None:
        budget.charge(size, what)
    body = image[inode.i_u * bs : inode.i_u * bs + head] if head else b""
    return body + image[tail_off : tail_off + size - head]


def symlink_target(image: bytes, sb: SuperBlock, inode: Inode,
                   budget: Budget | None = None) -> bytes:
    """A symlink's target (``inode_data``); FormatError if empty or over ``MAX_SYMLINK``.

    The size is checked before anything is read, so symlinks declaring huge targets
    cost nothing.
    """
    if not 0 < inode.size <= MAX_SYMLINK:
        raise FormatError(f"EROFS symlink nid {inode.nid}: target of {inode.size} bytes "
                          f"(1..{MAX_SYMLINK} allowed)")
    return inode_data(image, sb, inode, budget)


@dataclass(frozen=True, slots=True)
class Dirent:
    """One directory entry: the target nid, the raw name, the ``FT_*`` file type."""

    nid: int
    name: bytes
    file_type: int


def parse_dirents(data: bytes, block_size: int) -> list[Dirent]:
    """Decode a directory's data: per block, dirents then their names.

    Each block starts with dirents whose first ``nameoff`` gives their count; a name
    runs to the next dirent's ``nameoff`` (the last one to the block's end, cut at the
    first NUL). Raises FormatError for an empty block, misaligned or out-of-order name
    offsets, and names that are empty or longer than 255 bytes.
    """
    out: list[Dirent] = []
    for start in range(0, len(data), block_size):
        block = data[start : start + block_size]
        if len(block) < DIRENT_SIZE:
            raise FormatError(f"directory block at {start} too short for a dirent")
        first = _DIRENT.unpack_from(block, 0)[1]
        if first < DIRENT_SIZE or first % DIRENT_SIZE or first > len(block):
            raise FormatError(f"directory block at {start}: bad first name offset {first}")
        ents = [_DIRENT.unpack_from(block, i) for i in range(0, first, DIRENT_SIZE)]
        for i, (nid, nameoff, ftype) in enumerate(ents):
            end = ents[i + 1][1] if i + 1 < len(ents) else len(block)
            if not first <= nameoff <= end <= len(block):
                raise FormatError(f"directory block at {start}: name offsets out of order")
            name = block[nameoff:end]
            if i + 1 == len(ents):
                name = name.split(b"\0", 1)[0]
            if not 0 < len(name) <= MAX_NAME:
                raise FormatError(f"directory block at {start}: name of {len(name)} bytes")
            out.append(Dirent(nid, name, ftype))
    return out


def _xattr_entry(image: bytes, pos: int, limit: int, what: str) -> tuple[str, bytes, int]:
    """Decode the xattr entry at ``pos`` (ending before ``limit``); return name, value, size."""
    name_len, index, value_size = _ints(_unpack(_XATTR_ENTRY, image, pos, what))
    end = pos + XATTR_ENTRY_SIZE + name_len + value_size
    if end > limit:
        raise FormatError(f"{what}: entry runs past its area")
    prefix = XATTR_PREFIXES.get(index)
    if prefix is None:
        raise FormatError(f"{what}: unsupported xattr name index {index}")
    suffix = image[pos + XATTR_ENTRY_SIZE : pos + XATTR_ENTRY_SIZE + name_len]
    value = image[pos + XATTR_ENTRY_SIZE + name_len : end]
    total = -(-(end - pos) // XATTR_ENTRY_SIZE) * XATTR_ENTRY_SIZE
    return prefix + suffix.decode("utf-8", "surrogateescape"), value, total


class XattrCache:
    """Shared xattr entries decoded once per id, for all the inodes of one parse.

    Inodes name shared entries by 4-byte ids, and any number of inodes may name the same
    (up to 64 KiB) entry: decoding it for each would let a small image cost a lot, so
    each id is decoded once, its bytes charged to the parse's ``Budget``, and every
    inode naming it gets the same ``(name, value)`` objects.
    """

    __slots__ = ("budget", "entries")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.entries: dict[int, tuple[str, bytes]] = {}

    def get(self, image: bytes, sb: SuperBlock, xid: int, what: str) -> tuple[str, bytes]:
        """The shared entry ``xid`` (FormatError if it is malformed or over the budget)."""
        entry = self.entries.get(xid)
        if entry is None:
            at = sb.xattr_blkaddr * sb.block_size + XATTR_ENTRY_SIZE * xid
            name, value, size = _xattr_entry(image, at, len(image),
                                             f"{what} (shared id {xid})")
            self.budget.charge(size, f"{what} (shared id {xid})")
            entry = self.entries[xid] = (name, value)
        return entry


def parse_xattrs(image: bytes, sb: SuperBlock, inode: Inode,
                 cache: XattrCache | None = None) -> dict[str, bytes]:
    """The inode's xattrs: shared ones (by id into the xattr area) then inline ones.

    Raises FormatError for entries past their area, an unknown name index (including
    the long-prefix indexes of images with the ``xattr_prefixes`` feature; the kernel
    would skip those, but silently dropping e.g. a capability is worse) or ids past the
    image. The inline body was range-checked (and, in ``walk``, charged) with the inode;
    shared entries go through ``cache`` (a fresh one per call when None: callers decoding
    many inodes pass one ``XattrCache`` so each shared entry is decoded once).
    """
    if not inode.xattr_icount:
        return {}
    what = f"EROFS inode nid {inode.nid} xattrs"
    start = inode.offset + inode.core_size
    end = start + inode.xattr_size
    _check(image, start, inode.xattr_size, what)
    shared = image[start + 4]
    pos = start + XATTR_HEADER_SIZE + 4 * shared
    if pos > end:
        raise FormatError(f"{what}: {shared} shared ids do not fit")
    if cache is None:
        cache = XattrCache(Budget.for_image(image))
    out: dict[str, bytes] = {}
    for i in range(shared):
        (xid,) = _U32.unpack_from(image, start + XATTR_HEADER_SIZE + 4 * i)
        name, value = cache.get(image, sb, xid, what)
        out.setdefault(name, value)
    while pos < end:
        name, value, size = _xattr_entry(image, pos, end, what)
        out.setdefault(name, value)
        pos += size
    return out


@dataclass(frozen=True, slots=True)
class ChunkIndex:
    """An 8-byte ``erofs_inode_chunk_index`` (``advise`` = ``startblk_hi`` in newer EROFS)."""

    advise: int
    device_id: int
    blkaddr: int


def chunk_format(inode: Inode) -> tuple[bool, int]:
    """(has 8-byte indexes, chunk bits) of a chunk-based inode; FormatError if not one."""
    if inode.layout != LAYOUT_CHUNK_BASED:
        raise FormatError(f"EROFS inode nid {inode.nid} is not chunk-based")
    fmt = inode.i_u & 0xFFFF
    if fmt & ~(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES):
        raise FormatError(f"EROFS inode nid {inode.nid}: bad chunk format {fmt:#x}")
    return bool(fmt & CHUNK_FORMAT_INDEXES), fmt & CHUNK_FORMAT_BLKBITS_MASK


def chunk_count(inode: Inode, sb: SuperBlock) -> int:
    """How many chunks the EROFS chunk format gives the inode (``ceil(size / chunk)``)."""
    _, bits = chunk_format(inode)
    chunk = sb.block_size << bits
    return -(-inode.size // chunk)


def _chunk_area(image: bytes, inode: Inode, unit: int, count: int,
                budget: Budget | None) -> int:
    """Where the inode's ``count`` entries of ``unit`` bytes start; checked and charged."""
    base = inode.offset + inode.core_size + inode.xattr_size
    start = -(-base // unit) * unit
    what = f"EROFS inode nid {inode.nid} chunk table"
    _check(image, start, unit * count, what)
    if budget is not None:
        budget.charge(unit * count, what)
    return start


def parse_chunk_indexes(image: bytes, inode: Inode, count: int,
                        budget: Budget | None = None) -> list[ChunkIndex]:
    """The first ``count`` chunk indexes of a chunk-based inode with 8-byte indexes.

    ``count`` is the caller's (EROFS: ``chunk_count``; RAFS v6 counts by its own chunk
    size); the table's range is checked (and charged to ``budget``) before anything is
    decoded. FormatError if the inode has a block map instead or the table is truncated.
    """
    indexes, _ = chunk_format(inode)
    if not indexes:
        raise FormatError(f"EROFS inode nid {inode.nid} has a block map, not chunk indexes")
    start = _chunk_area(image, inode, _CHUNK_INDEX.size, count, budget)
    return [ChunkIndex(*_CHUNK_INDEX.unpack_from(image, start + 8 * i)) for i in range(count)]


def parse_block_map(image: bytes, inode: Inode, count: int,
                    budget: Budget | None = None) -> list[int]:
    """The first ``count`` 4-byte block addresses of a chunk-based inode without indexes
    (range checked and charged to ``budget`` first, as in ``parse_chunk_indexes``)."""
    indexes, _ = chunk_format(inode)
    if indexes:
        raise FormatError(f"EROFS inode nid {inode.nid} has chunk indexes, not a block map")
    start = _chunk_area(image, inode, 4, count, budget)
    return list(struct.unpack_from(f"<{count}I", image, start))


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """An ``erofs_deviceslot``: tag (RAFS: blob id), size in blocks, mapped address."""

    tag: bytes
    blocks: int
    mapped_blkaddr: int


def parse_device_table(image: bytes, sb: SuperBlock) -> list[DeviceSlot]:
    """The ``extra_devices`` slots at ``devt_slotoff * 128`` (FormatError if truncated)."""
    base = sb.devt_slotoff * DEVICE_SLOT_SIZE
    _check(image, base, DEVICE_SLOT_SIZE * sb.extra_devices, "EROFS device table")
    out = []
    for i in range(sb.extra_devices):
        tag, blocks_lo, addr_lo, blocks_hi, addr_hi = _DEVICE.unpack_from(image, base + 128 * i)
        out.append(DeviceSlot(tag.rstrip(b"\0"), blocks_lo | blocks_hi << 32,
                              addr_lo | addr_hi << 32))
    return out


@dataclass(frozen=True, slots=True)
class Entry:
    """A name in the tree: ``parent`` nid (None for the root), raw name, the inode."""

    parent: int | None
    name: bytes
    inode: Inode


def walk(image: bytes, sb: SuperBlock, budget: Budget | None = None) -> Iterator[Entry]:
    """Yield the root (name ``b""``) then every other name, directories breadth first.

    A hard-linked inode is yielded once per name (the same ``Inode``, parsed once). The
    walk is iterative. Each inode's core and xattr body and each directory's data are
    charged to ``budget`` (``Budget.for_image(image)`` when None) before they are
    decoded. Raises FormatError when the root is not a directory, a directory lacks a
    correct ``.``/``..``, is reached twice (a cycle or a directory hard link), a
    dirent's file type contradicts the inode; LimitExceeded (a FormatError) when the
    tree is deeper than ``MAX_DEPTH`` or the budget runs out (structures that overlap,
    e.g. directories sharing blocks).
    """
    if budget is None:
        budget = Budget.for_image(image)
    root = parse_inode(image, sb, sb.root_nid)
    if not root.is_dir:
        raise FormatError(f"EROFS root nid {sb.root_nid} is not a directory")
    budget.charge(root.core_size + root.xattr_size, f"EROFS inode nid {root.nid}")
    yield Entry(None, b"", root)
    inodes = {root.nid: root}
    queue = deque([(root, root.nid, 0)])
    while queue:
        node, parent, depth = queue.popleft()
        ents = parse_dirents(inode_data(image, sb, node, budget), sb.block_size)
        dots = [(e.name, e.nid) for e in ents if e.name in (b".", b"..")]
        if sorted(dots) != [(b".", node.nid), (b"..", parent)]:
            raise FormatError(f"EROFS directory nid {node.nid}: missing or wrong . / ..")
        for ent in ents:
            if ent.name in (b".", b".."):
                continue
            child = inodes.get(ent.nid)
            if child is None:
                child = parse_inode(image, sb, ent.nid)
                budget.charge(child.core_size + child.xattr_size, f"EROFS inode nid {ent.nid}")
                inodes[ent.nid] = child
                if child.is_dir:
                    if depth + 1 > MAX_DEPTH:
                        raise LimitExceeded(f"EROFS directory nid {ent.nid} is nested deeper "
                                          f"than {MAX_DEPTH} levels")
                    queue.append((child, node.nid, depth + 1))
            elif child.is_dir:
                raise FormatError(f"EROFS directory nid {ent.nid} reached twice")
            if ent.file_type not in (FT_UNKNOWN, child.file_type):
                raise FormatError(f"EROFS dirent {ent.name!r}: file type {ent.file_type} but "
                                  f"inode mode {child.mode:#o}")
            yield Entry(node.nid, ent.name, child)
