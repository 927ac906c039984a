"""What RAFS v5 and v6 share: superblock flag bits, the 80-byte chunk-info record
(``RafsV5ChunkInfo``, also v6's chunk table), ``BlobInfo``, a bounds-checked ``unpack``,
and ``TreeBuilder``, which turns names and nodes into the overlay presentation the FUSE
daemon serves (see the package docstring for its rules and the bounds).

Every parser here raises only FormatError (never IndexError, struct.error, ...).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats import detect, erofs
from snapshotter.formats.index import (
    ROOT_INO,
    Chunk,
    LayerIndex,
    Node,
    NodeKind,
    check_name,
)

RAFS_V5 = detect.RAFS_V5
RAFS_V6 = detect.RAFS_V6

# RafsSuperFlags (rafs/src/metadata/mod.rs)
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200
FLAG_ENCRYPTION_NONE = 0x0100_0000
FLAG_ENCRYPTION_AES_128_XTS = 0x0200_0000
KNOWN_FLAGS = 0x3FF | 0xFF00_0000  # the named bits plus the reserved compat bits
FLAG_NAMES = {
    FLAG_COMPRESSION_NONE: "COMPRESSION_NONE",
    FLAG_COMPRESSION_LZ4: "COMPRESSION_LZ4",
    FLAG_HASH_BLAKE3: "HASH_BLAKE3",
    FLAG_HASH_SHA256: "HASH_SHA256",
    FLAG_EXPLICIT_UID_GID: "EXPLICIT_UID_GID",
    FLAG_HAS_XATTR: "HAS_XATTR",
    FLAG_COMPRESSION_GZIP: "COMPRESSION_GZIP",
    FLAG_COMPRESSION_ZSTD: "COMPRESSION_ZSTD",
    FLAG_INLINED_CHUNK_DIGEST: "INLINED_CHUNK_DIGEST",
    FLAG_TARFS_MODE: "TARFS_MODE",
    FLAG_ENCRYPTION_NONE: "ENCRYPTION_NONE",
    FLAG_ENCRYPTION_AES_128_XTS: "ENCRYPTION_AES_128_XTS",
}
# Precedence as in nydus' `From<RafsSuperFlags>`: the first bit present wins.
_COMPRESSION_FLAGS = (
    (FLAG_COMPRESSION_NONE, "none"),
    (FLAG_COMPRESSION_LZ4, "lz4_block"),
    (FLAG_COMPRESSION_GZIP, "gzip"),
    (FLAG_COMPRESSION_ZSTD, "zstd"),
)
_DIGEST_FLAGS = ((FLAG_HASH_BLAKE3, "blake3"), (FLAG_HASH_SHA256, "sha256"))
# compress::Algorithm / digest::Algorithm values in the v6 blob table.
COMPRESSION_BY_ALGO = {0: "none", 1: "lz4_block", 2: "gzip", 3: "zstd"}
DIGEST_BY_ALGO = {0: "blake3", 1: "sha256"}

# BlobChunkFlags
CHUNK_COMPRESSED = 0x1
CHUNK_HOLE = 0x2
CHUNK_ENCRYPTED = 0x4
CHUNK_BATCH = 0x8
CHUNK_HAS_CRC32 = 0x10

MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 16 << 20  # RAFS_MAX_CHUNK_SIZE
MAX_COMPRESSED_CHUNK = 2 * MAX_CHUNK_SIZE  # incompressible data grows a little, never 2x
MAX_SYMLINK = erofs.MAX_SYMLINK  # longest symlink target (Linux: below PATH_MAX)
MAX_DEPTH = erofs.MAX_DEPTH  # deepest directory nesting (root: depth 0)
CHUNK_INFO = struct.Struct("<32sIIIIQQQII")  # RafsV5ChunkInfo, 80 bytes
OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT = b".wh."
_WHITEOUT_META = b".wh..wh."
_OPAQUE = b".wh..wh..opq"


def unpack(st: struct.Struct, buf: bytes, offset: int, what: str) -> tuple[int | bytes, ...]:
    """``st.unpack_from(buf, offset)`` after checking the record lies inside ``buf``.

    Raises FormatError naming ``what`` when ``offset`` is negative or the record runs past
    the end (so a truncated bootstrap or a wild offset is reported, never struct.error).
    """
    if offset < 0 or offset + st.size > len(buf):
        raise FormatError(f"{what} at offset {offset} ({st.size} bytes) lies outside the "
                          f"{len(buf)}-byte bootstrap")
    return st.unpack_from(buf, offset)


def ints(values: tuple[int | bytes, ...]) -> tuple[int, ...]:
    """Narrow a tuple of unpacked integers (a typing helper; FormatError on a bytes field)."""
    out = tuple(v for v in values if isinstance(v, int))
    if len(out) != len(values):
        raise FormatError("internal: bytes field where an integer was expected")
    return out


def check_range(offset: int, size: int, total: int, what: str) -> None:
    """Raise FormatError unless ``[offset, offset + size)`` lies inside ``[0, total)``."""
    if offset < 0 or size < 0 or offset + size > total:
        raise FormatError(f"{what} [{offset}, {offset + size}) lies outside the "
                          f"{total}-byte bootstrap")


def check_blob_id(raw: bytes, what: str) -> str:
    """A blob id as text; FormatError unless it is 1..128 printable ASCII characters.

    Ids are hex sha256 digests in practice; anything usable as a path component is
    accepted, but never ``/``, ``.``/``..`` or whitespace, since readers open
    ``<blob dir>/<blob id>``.
    """
    if not 0 < len(raw) <= 128 or any(not 0x21 <= c <= 0x7E for c in raw) or b"/" in raw \
            or raw in (b".", b".."):
        raise FormatError(f"invalid blob id {raw[:80]!r} in the {what}")
    return raw.decode("ascii")


def flag_names(flags: int) -> list[str]:
    """Names of the set RafsSuperFlags bits, unknown ones as hex (for ``inspect``)."""
    return [FLAG_NAMES.get(1 << b, hex(1 << b)) for b in range(64) if flags >> b & 1]


def compression_from_flags(flags: int) -> str:
    """The chunk compression a RAFS superblock's flags select (nydus default: lz4_block)."""
    return next((name for bit, name in _COMPRESSION_FLAGS if flags & bit), "lz4_block")


def digest_from_flags(flags: int) -> str:
    """The chunk digest algorithm the flags select (nydus default: blake3)."""
    return next((name for bit, name in _DIGEST_FLAGS if flags & bit), "blake3")


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob named by a bootstrap's blob table.

    ``compressed_size`` is 0 when the bootstrap does not say (v5 without an extended
    blob table); ``features`` are nydus ``BlobFeatures`` bits (v6 only).
    """

    index: int
    blob_id: str
    compression: str
    digest: str
    chunk_size: int
    chunk_count: int = 0
    compressed_size: int = 0
    uncompressed_size: int = 0
    features: int = 0
    readahead_offset: int = 0
    readahead_size: int = 0


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """An 80-byte ``RafsV5ChunkInfo`` record (v5 inodes and the v6 chunk table)."""

    block_id: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    crc32: int


def parse_chunk_info(buf: bytes, offset: int, what: str = "chunk info") -> ChunkInfo:
    """Decode the chunk-info record at ``offset``; FormatError if it runs past the end."""
    block_id, *rest = unpack(CHUNK_INFO, buf, offset, what)
    if not isinstance(block_id, bytes):
        raise FormatError("internal: chunk digest is not bytes")
    return ChunkInfo(block_id, *ints(tuple(rest)))


def make_chunk(info: ChunkInfo, blob: BlobInfo, file_offset: int, size: int, what: str) -> Chunk:
    """The ``Chunk`` for bytes ``[file_offset, file_offset + size)`` of a file.

    Raises FormatError when the record cannot serve them: a size other than ``size``,
    batch, encrypted or hole chunks (unsupported), or a range past the blob's end.
    """
    if info.flags & (CHUNK_BATCH | CHUNK_ENCRYPTED | CHUNK_HOLE):
        raise FormatError(f"{what}: batch, encrypted and hole chunks are not supported "
                          f"(flags {info.flags:#x})")
    if info.uncompressed_size != size:
        raise FormatError(f"{what}: chunk holds {info.uncompressed_size} bytes, {size} expected")
    if info.compressed_size > MAX_COMPRESSED_CHUNK:
        raise FormatError(f"{what}: absurd compressed chunk size {info.compressed_size}")
    end = info.compressed_offset + info.compressed_size
    if blob.compressed_size and end > blob.compressed_size:
        raise FormatError(f"{what}: chunk range ends at {end}, past the end of blob "
                          f"{blob.blob_id} ({blob.compressed_size} bytes)")
    compressed = bool(info.flags & CHUNK_COMPRESSED) and blob.compression != "none"
    if not compressed and info.compressed_size != size:
        raise FormatError(f"{what}: uncompressed chunk stored in {info.compressed_size} bytes")
    return Chunk(
        file_offset=file_offset,
        size=size,
        blob_offset=info.compressed_offset,
        blob_end=end,
        inner_offset=0,
        digest=f"{blob.digest}:{info.block_id.hex()}",
        compression=blob.compression if compressed else "none",
        blob=blob.blob_id,
    )


def split_rdev(rdev: int) -> tuple[int, int]:
    """(major, minor) of a 32-bit Linux ``new_encode_dev``/glibc ``makedev`` number."""
    return (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


_KINDS = {
    0o040000: NodeKind.DIR,
    0o100000: NodeKind.REG,
    0o120000: NodeKind.SYMLINK,
    0o020000: NodeKind.CHAR,
    0o060000: NodeKind.BLOCK,
    0o010000: NodeKind.FIFO,
}
S_IFSOCK = 0o140000


def kind_of(mode: int, what: str) -> NodeKind | None:
    """The NodeKind of an ``st_mode``, None for a socket; FormatError for a bad type."""
    fmt = mode & 0o170000
    if fmt == S_IFSOCK:
        return None
    kind = _KINDS.get(fmt)
    if kind is None:
        raise FormatError(f"{what}: invalid file type in mode {mode:#o}")
    return kind


@dataclass
class TreeBuilder:
    """Collects nodes and names, then applies the rules in the module docstring.

    ``add`` and ``link`` raise FormatError for a duplicate inode number, an invalid name
    or a name listed twice in one directory; ``finish`` raises LimitExceeded (a
    FormatError) for a tree deeper than ``MAX_DEPTH``. Every pass is iterative and linear
    in the number of names.
    """

    format: str
    nodes: dict[int, Node] = field(default_factory=dict)

    def add(self, node: Node) -> None:
        """Register ``node`` under its inode number (FormatError if it is taken)."""
        if node.ino in self.nodes:
            raise FormatError(f"inode {node.ino} defined twice")
        self.nodes[node.ino] = node

    def link(self, parent: int, raw_name: bytes, ino: int) -> None:
        """List inode ``ino`` as ``raw_name`` in ``parent`` (non-UTF-8 bytes as surrogates)."""
        name = raw_name.decode("utf-8", "surrogateescape")
        check_name(name)
        children = self.nodes[parent].children
        if name in children:
            raise FormatError(f"directory inode {parent} lists {name!r} twice")
        children[name] = ino

    def finish(self, prefetch: list[int]) -> LayerIndex:
        """Resolve whiteouts, drop unreachable nodes, count links, plan prefetch, validate."""
        if ROOT_INO not in self.nodes or self.nodes[ROOT_INO].kind is not NodeKind.DIR:
            raise FormatError("bootstrap has no root directory")
        self._resolve_whiteouts()
        reachable = self._reachable()
        self.nodes = {ino: self.nodes[ino] for ino in sorted(reachable)}
        self._count_links()
        index = LayerIndex(self.nodes, self.format)
        index.prefetch_inos = self._expand_prefetch(prefetch)
        index.validate()
        return index

    def _resolve_whiteouts(self) -> None:
        names = self._name_counts()
        next_ino = max(self.nodes) + 1
        for ino in sorted(self.nodes):
            node = self.nodes[ino]
            if node.kind is not NodeKind.DIR:
                continue
            for name in sorted(node.children):
                raw = name.encode("utf-8", "surrogateescape")
                if not raw.startswith(_WHITEOUT):
                    continue
                child = self.nodes[node.children.pop(name)]
                if raw == _OPAQUE:
                    node.xattrs[OPAQUE_XATTR] = b"y"
                elif raw.startswith(_WHITEOUT_META):
                    continue
                else:
                    if child.kind is NodeKind.DIR:
                        raise FormatError(f"whiteout name {name!r} is used as a directory")
                    target = raw[len(_WHITEOUT):].decode("utf-8", "surrogateescape")
                    check_name(target)
                    if target in node.children:
                        continue  # a real entry in the same layer wins over its whiteout
                    if names[child.ino] > 1:
                        child = Node(next_ino, NodeKind.CHAR, 0, uid=child.uid,
                                     gid=child.gid, mtime_ns=child.mtime_ns)
                        self.nodes[next_ino] = child
                        next_ino += 1
                    _make_whiteout(child)
                    child.parent = ino
                    node.children[target] = child.ino

    def _name_counts(self) -> dict[int, int]:
        counts = dict.fromkeys(self.nodes, 0)
        for node in self.nodes.values():
            for child in node.children.values():
                counts[child] += 1
        return counts

    def _reachable(self) -> set[int]:
        """Inodes reachable from the root, breadth first; LimitExceeded past ``MAX_DEPTH``."""
        seen = {ROOT_INO}
        queue = deque([(ROOT_INO, 0)])
        while queue:
            ino, depth = queue.popleft()
            for child in self.nodes[ino].children.values():
                if child not in seen:
                    seen.add(child)
                    if self.nodes[child].kind is NodeKind.DIR:
                        if depth + 1 > MAX_DEPTH:
                            raise LimitExceeded(f"directory inode {child} is nested deeper "
                                              f"than {MAX_DEPTH} levels")
                        queue.append((child, depth + 1))
        return seen

    def _count_links(self) -> None:
        counts = self._name_counts()
        for node in self.nodes.values():
            if node.kind is NodeKind.DIR:
                node.nlink = 2 + sum(self.nodes[c].kind is NodeKind.DIR
                                     for c in node.children.values())
            else:
                node.nlink = counts[node.ino]

    def _expand_prefetch(self, table: list[int]) -> list[int]:
        out: dict[int, None] = {}
        expanded: set[int] = set()  # each directory once: the table may repeat them
        for ino in table:
            node = self.nodes.get(ino)
            if node is None:
                continue
            stack = [node]
            while stack:
                cur = stack.pop()
                if cur.kind is NodeKind.REG:
                    out.setdefault(cur.ino, None)
                elif cur.kind is NodeKind.DIR and cur.ino not in expanded:
                    expanded.add(cur.ino)
                    stack.extend(self.nodes[cur.children[n]] for n in sorted(cur.children,
                                                                             reverse=True))
        return list(out)


def _make_whiteout(node: Node) -> None:
    node.kind, node.mode, node.size = NodeKind.CHAR, 0, 0
    node.rdev_major = node.rdev_minor = 0
    node.xattrs, node.chunks, node.link_target, node.digest = {}, [], b"", ""
