"""Write a RAFS v6 bootstrap (an EROFS image with nydus extensions) and its data blob.

Layout (protocol-reference §5.6, nydus-image ``builder/src/core/v6.rs``): block 0 holds
the EROFS superblock at 1024, the RAFS extended superblock at 1152 and the device slot at
1408; block 1 the blob table (one 256-byte ``RafsV6Blob``) and the prefetch table (nids);
``meta_blkaddr`` is 2 and the inodes start in block 3, so the root's nid is 128 as in
nydus-image output. Inodes are compact (32 bytes) when their fields fit, extended (64)
otherwise, never crossing a block; a directory's dirents and a symlink's target are inline
after the inode when the tail fits its block, else in data blocks after the inodes;
regular files are chunk-based (layout 4) with one 8-byte chunk index per RAFS chunk
(device id 1 = the blob, 24-bit chunk index, uncompressed block address). The chunk table
(80-byte ``RafsV5ChunkInfo`` records, one per distinct chunk) follows, 4 KiB aligned. An
inode's core, xattrs and inline tail never cross a block; its chunk indexes may.

With ``compression="none"`` every chunk sits at its 4 KiB aligned uncompressed offset, so
``fsck.erofs --device=<blob>`` reads the output as a plain multi-device EROFS image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from snapshotter.errdefs import InvalidArgument
from snapshotter.formats import erofs
from snapshotter.tools.convert.tree import (
    BS,
    COMPRESSION_ALGO,
    COMPRESSION_FLAG,
    DEFAULT_CHUNK_SIZE,
    DIGEST_ALGO,
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

FT = {"reg": 1, "dir": 2, "char": 3, "block": 4, "fifo": 5, "sock": 6, "symlink": 7}
XATTR_INDEX = [("system.posix_acl_access", 2), ("system.posix_acl_default", 3),
               ("user.", 1), ("trusted.", 4), ("security.", 6)]
COMPAT_RAFS_V6 = 0x4000_0000
INCOMPAT_RAFS_V6 = 0xC
BLOB_ALIGNED = 0x1
META_BLKADDR = 2
DEVT_SLOTOFF = 11
Chunks = dict[int, list[tuple[int, ChunkRec]]]


def _xattrs(xattrs: dict[str, bytes]) -> bytes:
    """Inline xattrs: a 12-byte header then 4-aligned entries (no shared xattrs)."""
    if not xattrs:
        return b""
    out = bytearray(12)
    for key, value in sorted(xattrs.items()):
        found = next(((p, i) for p, i in XATTR_INDEX if key.startswith(p)), None)
        if found is None:
            raise InvalidArgument(f"xattr {key!r} has no EROFS name prefix")
        suffix = key[len(found[0]):].encode("utf-8", "surrogateescape")
        entry = struct.pack("<BBH", len(suffix), found[1], len(value)) + suffix + value
        out += entry.ljust(align(len(entry), 4), b"\0")
    return bytes(out)


def dir_blocks(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Directory data: per 4 KiB block, dirents (nid, name offset, type) then names."""
    blocks: list[list[tuple[bytes, int, int]]] = [[]]
    used = 0
    for ent in entries:
        if used + 12 + len(ent[0]) > BS:
            blocks.append([])
            used = 0
        blocks[-1].append(ent)
        used += 12 + len(ent[0])
    out = bytearray()
    for i, block in enumerate(blocks):
        nameoff = 12 * len(block)
        raw = bytearray()
        for name, nid, ftype in block:
            raw += struct.pack("<QHBx", nid, nameoff, ftype)
            nameoff += len(name)
        raw += b"".join(name for name, _, _ in block)
        out += raw if i + 1 == len(blocks) else raw.ljust(BS, b"\0")
    return bytes(out)


@dataclass
class _Inode:
    path: str
    spec: Spec
    compact: bool
    xattrs: bytes
    size: int
    nchunks: int = 0
    offset: int = 0
    inline: bool = False

    @property
    def core(self) -> int:
        return 32 if self.compact else 64

    def record_len(self) -> int:
        if self.spec.kind == "reg":
            return align(self.core + len(self.xattrs), 8) + 8 * self.nchunks
        tail = self.size % BS if self.inline else 0
        return self.core + len(self.xattrs) + tail


def _layout(inodes: list[_Inode], start: int) -> int:
    """Assign inode offsets from ``start`` (32-byte slots, no record crossing a block)."""
    off = start
    for ino in inodes:
        if ino.spec.kind in ("dir", "symlink"):
            tail = ino.size % BS
            ino.inline = tail != 0 and ino.core + len(ino.xattrs) + tail <= BS
        length = ino.record_len()
        # The core, xattrs and inline tail stay in one block; chunk indexes may run on.
        head = length - 8 * ino.nchunks
        if head > BS:
            raise InvalidArgument(f"{ino.path!r}: inode with {head} bytes of xattrs")
        if off % BS + head > BS:
            off = align(off, BS)
        ino.offset = off
        off = align(off + length, 32)
    return off


def _core(ino: _Inode, nid_of: dict[int, int], tree: Tree, i_u: int) -> bytes:
    spec = ino.spec
    mode = TYPE_BITS[spec.kind] | spec.mode
    layout = erofs.LAYOUT_CHUNK_BASED if spec.kind == "reg" else (
        erofs.LAYOUT_FLAT_INLINE if ino.inline else erofs.LAYOUT_FLAT_PLAIN)
    icount = (len(ino.xattrs) - 12) // 4 + 1 if ino.xattrs else 0
    nlink = tree.nlink(ino.path)
    if ino.compact:
        return struct.pack("<HHHHIIIIHH4x", layout << 1, icount, mode, nlink, ino.size,
                           spec.mtime, i_u, nid_of[id(spec)] & 0xFFFFFFFF, spec.uid, spec.gid)
    return struct.pack("<HHHHQIIIIQII16x", 1 | layout << 1, icount, mode, 0, ino.size, i_u,
                       nid_of[id(spec)] & 0xFFFFFFFF, spec.uid, spec.gid, spec.mtime,
                       spec.mtime_nsec, nlink)


def _inodes(tree: Tree, blob: BlobBuilder, chunk_size: int, compact: bool
            ) -> tuple[list[_Inode], Chunks]:
    """One ``_Inode`` per inode in breadth-first order, and each file's chunks."""
    seen: set[int] = set()
    inodes: list[_Inode] = []
    chunks: Chunks = {}
    for path in tree.bfs():
        spec = tree.inode[path]
        if id(spec) in seen:
            continue
        seen.add(id(spec))
        small = (spec.uid | spec.gid) <= 0xFFFF and spec.mtime_nsec == 0 and \
            0 <= spec.mtime < 1 << 32 and tree.nlink(path) <= 0xFFFF
        size = {"reg": len(spec.data), "symlink": len(spec.target)}.get(spec.kind, 0)
        if spec.kind == "dir":
            names = [b".", b".."] + [c.rpartition("/")[2].encode("utf-8", "surrogateescape")
                                     for c in tree.children[path]]
            size = len(dir_blocks([(n, 0, 0) for n in sorted(names)]))
        ino = _Inode(path, spec, compact and small and size < 1 << 32, _xattrs(spec.xattrs),
                     size)
        if spec.kind == "reg":
            chunks[id(spec)] = blob.file_chunks(spec.data, chunk_size)
            ino.nchunks = len(chunks[id(spec)])
        inodes.append(ino)
    return inodes, chunks


def _payload(ino: _Inode, tree: Tree, nid_of: dict[int, int],
             chunk_size: int) -> tuple[bytes, int]:
    """(data: dirents or symlink target, the inode's ``i_u`` when it has no data blocks)."""
    spec = ino.spec
    if spec.kind == "dir":
        parent = ino.path.rpartition("/")[0]
        ents = [(b".", nid_of[id(spec)], 2), (b"..", nid_of[id(tree.inode[parent])], 2)]
        ents += [(c.rpartition("/")[2].encode("utf-8", "surrogateescape"),
                  nid_of[id(tree.inode[c])], FT[tree.inode[c].kind])
                 for c in tree.children[ino.path]]
        return dir_blocks(sorted(ents)), 0
    if spec.kind == "symlink":
        return spec.target, 0
    if spec.kind in ("char", "block"):
        return b"", encode_rdev(*spec.rdev)
    if spec.kind == "reg":
        return b"", erofs.CHUNK_FORMAT_INDEXES | (chunk_size.bit_length() - 1 - 12)
    return b"", 0


def _write_inode(boot: bytearray, ino: _Inode, tree: Tree, nid_of: dict[int, int],
                 chunks: list[tuple[int, ChunkRec]], chunk_size: int) -> None:
    """Write the inode, its xattrs, inline tail or chunk indexes; append its data blocks."""
    payload, i_u = _payload(ino, tree, nid_of, chunk_size)
    head = len(payload) - (len(payload) % BS if ino.inline else 0)
    if head:
        i_u = len(boot) // BS
        boot += payload[:head].ljust(align(head, BS), b"\0")
    core = _core(ino, nid_of, tree, i_u) + ino.xattrs
    boot[ino.offset : ino.offset + len(core)] = core
    if ino.inline:
        tail = payload[head:]
        boot[ino.offset + len(core) : ino.offset + len(core) + len(tail)] = tail
    at = ino.offset + align(len(core), 8)
    for i, (_, c) in enumerate(chunks):
        idx = struct.pack("<HHI", c.index & 0xFFFF, 1 | (c.index >> 16) << 8, c.uoff // BS)
        boot[at + 8 * i : at + 8 * i + 8] = idx


@dataclass(frozen=True)
class _Tables:
    blob_id: str
    blob_size: int
    root_nid: int
    inodes: int
    chunk_table: int
    chunk_size: int
    compression: str
    digest: str
    flags: int
    prefetch: list[int]


def _tables(boot: bytearray, blob: BlobBuilder, t: _Tables) -> None:
    """Fill in the superblocks, the device slot, the blob entry and the prefetch table."""
    blob_id = t.blob_id.encode()
    table_size = 80 * len(blob.chunks)
    sb = struct.pack("<IIIBBHQQIIII16s16sIHHH", erofs.MAGIC, 0, COMPAT_RAFS_V6, 12, 0,
                     t.root_nid, t.inodes, 0, 0, len(boot) // BS, META_BLKADDR, 0, bytes(16),
                     bytes(16), INCOMPAT_RAFS_V6, 0, 1, DEVT_SLOTOFF)
    boot[1024 : 1024 + len(sb)] = sb
    pf_off = BS + 256
    boot[1152:1408] = struct.pack("<QQIIQQQI4x200x", t.flags, BS, 256, t.chunk_size,
                                  t.chunk_table, table_size, pf_off if t.prefetch else 0,
                                  4 * len(t.prefetch))
    boot[1408:1536] = struct.pack("<64sII56x", blob_id, align(blob.uoff, BS) // BS, 0)
    boot[BS : BS + 256] = struct.pack(
        "<64sIIIIIIQQIIQQQ32s32sQ8sI36x", blob_id, 0, t.chunk_size, len(blob.chunks),
        COMPRESSION_ALGO[t.compression], DIGEST_ALGO[t.digest], BLOB_ALIGNED, len(blob.data),
        blob.uoff, 0, 0, 0, 0, 0, bytes(32), bytes(32), 0, bytes(8), 0)
    boot[pf_off : pf_off + 4 * len(t.prefetch)] = struct.pack(f"<{len(t.prefetch)}I",
                                                              *t.prefetch)


def write_v6(specs: list[Spec], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
             compression: str = "none", digest: str = "blake3",
             prefetch: tuple[str, ...] = (), compact: bool = True,
             blob_trailer: bool = False) -> Image:
    """A RAFS v6 bootstrap and blob for ``specs`` (see the module docstring).

    ``prefetch`` lists paths for the prefetch table (at most 60 fit its block);
    ``compact`` allows 32-byte inodes; ``blob_trailer`` appends the ``image.blob`` tar
    header to the blob (``tree.py``). Raises InvalidArgument for bad options or input.
    """
    check_options(chunk_size, compression, digest)
    if len(prefetch) > (BS - 256) // 4:
        raise InvalidArgument(f"at most {(BS - 256) // 4} prefetch paths, got {len(prefetch)}")
    tree = Tree(specs)
    blob = BlobBuilder(compression, digest, aligned=True)
    inodes, chunks = _inodes(tree, blob, chunk_size, compact)
    meta = META_BLKADDR * BS
    meta_end = _layout(inodes, meta + BS)
    nid_of = {id(i.spec): (i.offset - meta) // 32 for i in inodes}
    boot = bytearray(align(meta_end, BS))
    for ino in inodes:
        _write_inode(boot, ino, tree, nid_of, chunks.get(id(ino.spec), []), chunk_size)
    chunk_table = len(boot)
    table = b"".join(chunk_info(c, 0) for c in blob.chunks)
    boot += table.ljust(align(len(table), BS), b"\0")
    blob_id, blob_bytes = blob.finish(blob_trailer)
    flags = COMPRESSION_FLAG[compression] | DIGEST_FLAG[digest] | FLAG_EXPLICIT_UID_GID
    flags |= FLAG_HAS_XATTR if tree.has_xattrs() else 0
    _tables(boot, blob, _Tables(
        blob_id, len(blob_bytes), nid_of[id(tree.inode[""])], len(inodes), chunk_table,
        chunk_size, compression, digest, flags,
        [nid_of[id(tree.lookup(p))] for p in prefetch]))
    return Image(bytes(boot), {blob_id: blob_bytes})
