"""Write a RAFS v5 bootstrap and its data blob (protocol-reference §5.5).

The layout follows nydus-image's v5 dump: the 8 KiB superblock, the inode table (u32
offsets >> 3, one per name, in breadth-first order so that a directory's children are a
contiguous range starting at ``i_child_index``), the prefetch table (inode numbers), the
blob table (``readahead_offset``, ``readahead_size``, blob id), the extended blob table
(64-byte entries), then one record per name: the 128-byte inode, its name, symlink
target, xattr table and chunk infos, each 8-byte aligned. A hard link is a second
record with the same ``i_ino`` and the HARDLINK flag (nydus-image writes hard links so);
inode numbers are the breadth-first position of the first name of each inode.
"""

from __future__ import annotations

import struct

from snapshotter.tools.convert.tree import (
    COMPRESSION_FLAG,
    DEFAULT_CHUNK_SIZE,
    DIGEST_FLAG,
    FLAG_EXPLICIT_UID_GID,
    FLAG_HAS_XATTR,
    TYPE_BITS,
    BlobBuilder,
    ChunkRec,
    Image,
    Spec,
    Tree,
    align,
    check_options,
    chunk_info,
    encode_rdev,
)

SUPERBLOCK_SIZE = 8192
RAFS_V5_MAGIC = 0x52414653
RAFS_V5_VERSION = 0x500
INODE_SYMLINK = 0x1
INODE_HARDLINK = 0x2
INODE_XATTR = 0x4
_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
_SUPER = struct.Struct("<IIIIQQQQQIIIIQ")

Chunks = dict[int, list[tuple[int, ChunkRec]]]


def _xattrs(xattrs: dict[str, bytes]) -> bytes:
    """``RafsV5XAttrsTable``: u64 size, then (u32 len, ``name\\0value``) pairs, padded."""
    body = b"".join(struct.pack("<I", len(k) + 1 + len(v)) + k.encode() + b"\0" + v
                    for k, v in sorted(xattrs.items()))
    return struct.pack("<Q", len(body)) + body.ljust(align(len(body), 8), b"\0")


def _record(tree: Tree, path: str, inos: dict[int, int], ranges: dict[str, tuple[int, int]],
            chunks: Chunks) -> bytes:
    """The inode record of one name (see the module docstring)."""
    spec = tree.inode[path]
    name = path.rpartition("/")[2].encode("utf-8", "surrogateescape") if path else b"/"
    target = spec.target if spec.kind == "symlink" else b""
    nlink = tree.nlink(path)
    flags = (INODE_SYMLINK if target else 0) | (INODE_XATTR if spec.xattrs else 0)
    if nlink > 1 and spec.kind != "dir":
        flags |= INODE_HARDLINK
    parent = inos[id(tree.inode[path.rpartition("/")[0]])] if path else 0
    if spec.kind == "dir":
        index, count = ranges[path]
    else:
        index, count = 0, len(chunks.get(id(spec), []))
    size = {"reg": len(spec.data), "symlink": len(target), "dir": 4096}.get(spec.kind, 0)
    blocks = align(size, 512) // 512 if spec.kind == "reg" else 0
    head = _INODE.pack(bytes(32), parent, inos[id(spec)], spec.uid, spec.gid, 0,
                       TYPE_BITS[spec.kind] | spec.mode, size, blocks, flags, nlink, index,
                       count, len(name), len(target), encode_rdev(*spec.rdev),
                       spec.mtime_nsec, spec.mtime)
    out = head + name.ljust(align(len(name), 8), b"\0")
    out += target.ljust(align(len(target), 8), b"\0")
    if spec.xattrs:
        out += _xattrs(spec.xattrs)
    return out + b"".join(chunk_info(c, off) for off, c in chunks.get(id(spec), []))


def _numbering(tree: Tree, order: list[str]) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
    """(directory -> (first child's table index, child count), inode id -> inode number)."""
    pos = {p: i + 1 for i, p in enumerate(order)}
    ranges: dict[str, tuple[int, int]] = {}
    for path in order:
        if tree.inode[path].kind == "dir":
            kids = tree.children[path]
            ranges[path] = (pos[kids[0]] if kids else 0, len(kids))
    inos: dict[int, int] = {}
    for path in order:
        inos.setdefault(id(tree.inode[path]), pos[path])
    return ranges, inos


def write_v5(specs: list[Spec], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
             compression: str = "none", digest: str = "sha256",
             prefetch: tuple[str, ...] = (), blob_trailer: bool = False) -> Image:
    """A RAFS v5 bootstrap and blob for ``specs`` (see the module docstring).

    ``prefetch`` lists paths (files or directories) for the prefetch table;
    ``blob_trailer`` appends the ``image.blob`` tar header to the blob (``tree.py``).
    Raises InvalidArgument for bad options, input (``tree.py``) or prefetch paths.
    """
    check_options(chunk_size, compression, digest)
    tree = Tree(specs)
    order = tree.bfs()
    ranges, inos = _numbering(tree, order)
    blob = BlobBuilder(compression, digest, aligned=False)
    chunks: Chunks = {}
    for path in order:
        spec = tree.inode[path]
        if spec.kind == "reg" and id(spec) not in chunks:
            chunks[id(spec)] = blob.file_chunks(spec.data, chunk_size)
    blob_id, blob_bytes = blob.finish(blob_trailer)
    prefetch_inos = [inos[id(tree.lookup(p))] for p in prefetch]
    table_off = SUPERBLOCK_SIZE
    pf_off = table_off + align(4 * len(order), 8)
    bt_off = pf_off + align(4 * len(prefetch_inos), 8)
    blob_table = struct.pack("<II", 0, 0) + blob_id.encode()
    ext_off = bt_off + align(len(blob_table), 8)
    off = ext_off + 64
    records, table = [], []
    for path in order:
        rec = _record(tree, path, inos, ranges, chunks)
        table.append(off >> 3)
        records.append(rec)
        off += len(rec)
    flags = COMPRESSION_FLAG[compression] | DIGEST_FLAG[digest] | FLAG_EXPLICIT_UID_GID
    flags |= FLAG_HAS_XATTR if tree.has_xattrs() else 0
    sb = _SUPER.pack(RAFS_V5_MAGIC, RAFS_V5_VERSION, SUPERBLOCK_SIZE, chunk_size, flags,
                     len(inos), table_off, pf_off if prefetch_inos else 0, bt_off,
                     len(order), len(prefetch_inos), len(blob_table), 1, ext_off)
    out = bytearray(sb.ljust(SUPERBLOCK_SIZE, b"\0"))
    out += struct.pack(f"<{len(table)}I", *table).ljust(pf_off - table_off, b"\0")
    out += struct.pack(f"<{len(prefetch_inos)}I", *prefetch_inos).ljust(bt_off - pf_off, b"\0")
    out += blob_table.ljust(ext_off - bt_off, b"\0")
    out += struct.pack("<IIQQ40x", len(blob.chunks), 0, blob.uoff, len(blob.data))
    out += b"".join(records)
    return Image(bytes(out), {blob_id: blob_bytes})
