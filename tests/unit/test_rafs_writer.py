"""A test-only writer of RAFS v5 and v6 bootstraps and their data blob, plus its self-checks.

``write_v5(specs, ...)`` and ``write_v6(specs, ...)`` lay a tree out the way nydus-image
does (protocol-reference §5.5/§5.6): v5 with breadth-first child ranges in the inode
table and one record per name, v6 as an EROFS image with dirents, inline tails, chunk
indexes, the RAFS extended superblock, device/blob/chunk/prefetch tables. Each returns
an ``Image`` holding the bootstrap and ``{blob_id: blob bytes}``. The writers trust their
input; the tests decide what is valid. ``write_v6`` output with ``compression="none"``
keeps every chunk at its uncompressed (4 KiB aligned) offset, so ``fsck.erofs --device``
can read it as a plain multi-device EROFS image (checked below).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.formats import chunkcodec, erofs

BS = 4096
_REPO_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nydus"
FIXTURES = _REPO_FIXTURES if _REPO_FIXTURES.is_dir() else Path(
    os.environ.get("LAZYSNAP_NYDUS_FIXTURES", "/work/shared/fixtures/nydus"))
"""The upstream nydus fixtures (README there): ``tests/fixtures/nydus`` when vendored."""
_COMPRESSION_FLAG = {"none": 0x1, "lz4_block": 0x2, "gzip": 0x40, "zstd": 0x80}
_DIGEST_FLAG = {"blake3": 0x4, "sha256": 0x8}
_COMPRESSION_ALGO = {"none": 0, "lz4_block": 1, "gzip": 2, "zstd": 3}
_DIGEST_ALGO = {"blake3": 0, "sha256": 1}
_TYPE_BITS = {"dir": 0o040000, "reg": 0o100000, "symlink": 0o120000, "char": 0o020000,
              "block": 0o060000, "fifo": 0o010000, "sock": 0o140000}
_FT = {"reg": 1, "dir": 2, "char": 3, "block": 4, "fifo": 5, "sock": 6, "symlink": 7}
_XATTR_INDEX = [("system.posix_acl_access", 2), ("system.posix_acl_default", 3),
                ("user.", 1), ("trusted.", 4), ("security.", 6)]


@dataclass
class Spec:
    """One name in the tree. ``kind`` is dir/reg/symlink/char/block/fifo/sock/hardlink."""

    path: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    data: bytes = b""
    target: bytes = b""
    link: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Image:
    bootstrap: bytes
    blobs: dict[str, bytes]


def encode_rdev(major: int, minor: int) -> int:
    return (minor & 0xFF) | (major & 0xFFF) << 8 | (minor & ~0xFF) << 12


def _align(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _Tree:
    """Paths, their inode (hard links share a ``Spec``) and sorted children."""

    def __init__(self, specs: list[Spec]) -> None:
        self.inode: dict[str, Spec] = {"": Spec("", "dir", 0o755)}
        self.children: dict[str, list[str]] = {"": []}
        for spec in specs:
            parent, _, _ = spec.path.rpartition("/")
            self._dir(parent)
            target = self.inode[spec.link] if spec.kind == "hardlink" else spec
            self.inode[spec.path] = target
            self.children[parent].append(spec.path)
            if spec.kind == "dir":
                self.children.setdefault(spec.path, [])
        for kids in self.children.values():
            kids.sort(key=lambda p: p.rpartition("/")[2].encode())

    def _dir(self, path: str) -> None:
        if path in self.inode:
            return
        parent, _, _ = path.rpartition("/")
        self._dir(parent)
        self.inode[path] = Spec(path, "dir", 0o755)
        self.children[path] = []
        self.children[parent].append(path)

    def bfs(self) -> list[str]:
        out, queue = [""], [""]
        while queue:
            for child in self.children[queue.pop(0)]:
                out.append(child)
                if self.inode[child].kind == "dir":
                    queue.append(child)
        return out

    def nlink(self, path: str) -> int:
        spec = self.inode[path]
        if spec.kind == "dir":
            return 2 + sum(self.inode[c].kind == "dir" for c in self.children[path])
        return sum(1 for p, s in self.inode.items() if s is spec and p)


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    if compression == "lz4_block":
        import lz4.block  # type: ignore[import-untyped]

        return bytes(lz4.block.compress(data, store_size=False))
    if compression == "gzip":
        c = zlib.compressobj(wbits=31)
        return c.compress(data) + c.flush()
    return data


@dataclass
class _Chunk:
    digest: bytes
    flags: int
    csize: int
    usize: int
    coff: int
    uoff: int
    index: int


class _Blob:
    """Accumulates deduplicated chunks; ``aligned`` pads uncompressed offsets to 4 KiB."""

    def __init__(self, compression: str, digest: str, aligned: bool) -> None:
        self.compression, self.digest, self.aligned = compression, digest, aligned
        self.data = bytearray()
        self.uoff = 0
        self.by_digest: dict[bytes, _Chunk] = {}
        self.chunks: list[_Chunk] = []

    def add(self, raw: bytes) -> _Chunk:
        _, _, hexd = chunkcodec.compute_digest(raw, self.digest).partition(":")
        digest = bytes.fromhex(hexd)
        if digest in self.by_digest:
            return self.by_digest[digest]
        packed, flags = _compress(raw, self.compression), 1
        if self.compression == "none" or len(packed) >= len(raw):
            packed, flags = raw, 0
        if self.aligned and self.compression == "none":
            self.data.extend(bytes(self.uoff - len(self.data)))
        chunk = _Chunk(digest, flags, len(packed), len(raw), len(self.data), self.uoff,
                       len(self.chunks))
        self.data.extend(packed)
        self.uoff += _align(len(raw), BS) if self.aligned else len(raw)
        self.by_digest[digest] = chunk
        self.chunks.append(chunk)
        return chunk

    def blob_id(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _file_chunks(blob: _Blob, data: bytes, chunk_size: int) -> list[tuple[int, _Chunk]]:
    return [(off, blob.add(data[off : off + chunk_size])) for off in range(0, len(data),
                                                                            chunk_size)]


def _chunk_info(c: _Chunk, file_offset: int) -> bytes:
    return struct.pack("<32sIIIIQQQII", c.digest, 0, c.flags, c.csize, c.usize, c.coff, c.uoff,
                       file_offset, c.index, 0)


# --- RAFS v5 -------------------------------------------------------------------------------


def _v5_xattrs(xattrs: dict[str, bytes]) -> bytes:
    body = b"".join(struct.pack("<I", len(k) + 1 + len(v)) + k.encode() + b"\0" + v
                    for k, v in xattrs.items())
    return struct.pack("<Q", len(body)) + body.ljust(_align(len(body), 8), b"\0")


def _v5_record(tree: _Tree, path: str, inos: dict[int, int], ranges: dict[str, tuple[int, int]],
               chunks: dict[int, list[tuple[int, _Chunk]]]) -> bytes:
    spec = tree.inode[path]
    name = path.rpartition("/")[2].encode() if path else b"/"
    target = spec.target if spec.kind == "symlink" else b""
    flags = (0x1 if target else 0) | (0x2 if tree.nlink(path) > 1 and spec.kind != "dir"
                                      else 0) | (0x4 if spec.xattrs else 0)
    parent = inos[id(tree.inode[path.rpartition("/")[0]])] if path else 0
    if spec.kind == "dir":
        index, count = ranges[path]
    else:
        index, count = 0, len(chunks.get(id(spec), []))
    size = len(spec.data) if spec.kind == "reg" else len(target) if target else 4096 * (
        spec.kind == "dir")
    head = struct.pack("<32sQQIIIIQQQIIIHHIIQ8x", bytes(32), parent, inos[id(spec)], spec.uid,
                       spec.gid, 0, _TYPE_BITS[spec.kind] | spec.mode, size, 0, flags,
                       tree.nlink(path), index, count, len(name), len(target),
                       encode_rdev(*spec.rdev), spec.mtime_nsec, spec.mtime)
    out = head + name.ljust(_align(len(name), 8), b"\0") + target.ljust(_align(len(target), 8),
                                                                          b"\0")
    if spec.xattrs:
        out += _v5_xattrs(spec.xattrs)
    return out + b"".join(_chunk_info(c, off) for off, c in chunks.get(id(spec), []))


def write_v5(specs: list[Spec], *, chunk_size: int = BS, compression: str = "none",
             digest: str = "sha256", prefetch: tuple[str, ...] = ()) -> Image:
    """A RAFS v5 bootstrap and blob for ``specs`` (see the module docstring)."""
    tree = _Tree(specs)
    order = tree.bfs()
    ranges: dict[str, tuple[int, int]] = {}
    pos = {p: i + 1 for i, p in enumerate(order)}
    for path in order:
        kids = tree.children.get(path)
        if kids is not None and tree.inode[path].kind == "dir":
            ranges[path] = (pos[kids[0]] if kids else 0, len(kids))
    inos: dict[int, int] = {}
    for path in order:
        inos.setdefault(id(tree.inode[path]), pos[path])
    blob = _Blob(compression, digest, aligned=False)
    chunks = {id(s): _file_chunks(blob, s.data, chunk_size) for p, s in
              ((p, tree.inode[p]) for p in order) if s.kind == "reg"}
    blob_id = blob.blob_id()
    table_off = 8192
    prefetch_inos = [inos[id(tree.inode[p])] for p in prefetch]
    pf_off = table_off + _align(4 * len(order), 8)
    bt_off = pf_off + _align(4 * len(prefetch_inos), 8)
    blob_table = struct.pack("<II", 0, 0) + blob_id.encode()
    ext_off = bt_off + _align(len(blob_table), 8)
    off = ext_off + 64
    records, table = [], []
    for path in order:
        rec = _v5_record(tree, path, inos, ranges, chunks)
        table.append(off >> 3)
        records.append(rec)
        off += len(rec)
    flags = _COMPRESSION_FLAG[compression] | _DIGEST_FLAG[digest] | 0x10 | (
        0x20 if any(s.xattrs for s in tree.inode.values()) else 0)
    sb = struct.pack("<IIIIQQQQQIIIIQ", 0x52414653, 0x500, 8192, chunk_size, flags,
                     len({id(s) for s in tree.inode.values()}), table_off,
                     pf_off if prefetch_inos else 0, bt_off, len(order), len(prefetch_inos),
                     len(blob_table), 1, ext_off).ljust(8192, b"\0")
    out = bytearray(sb)
    out += struct.pack(f"<{len(table)}I", *table).ljust(pf_off - table_off, b"\0")
    out += struct.pack(f"<{len(prefetch_inos)}I", *prefetch_inos).ljust(bt_off - pf_off, b"\0")
    out += blob_table.ljust(ext_off - bt_off, b"\0")
    out += struct.pack("<IIQQ40x", len(blob.chunks), 0, blob.uoff, len(blob.data))
    out += b"".join(records)
    return Image(bytes(out), {blob_id: bytes(blob.data)})


# --- RAFS v6 -------------------------------------------------------------------------------


def _v6_xattrs(xattrs: dict[str, bytes]) -> bytes:
    if not xattrs:
        return b""
    out = bytearray(12)
    for key, value in xattrs.items():
        prefix, index = next((p, i) for p, i in _XATTR_INDEX if key.startswith(p))
        suffix = key[len(prefix):].encode()
        entry = struct.pack("<BBH", len(suffix), index, len(value)) + suffix + value
        out += entry.ljust(_align(len(entry), 4), b"\0")
    return bytes(out)


def _dir_blocks(entries: list[tuple[bytes, int, int]]) -> bytes:
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
class _V6Inode:
    path: str
    spec: Spec
    compact: bool
    xattrs: bytes
    size: int
    nchunks: int = 0
    offset: int = 0
    inline: bool = False
    data_blk: int = 0

    @property
    def core(self) -> int:
        return 32 if self.compact else 64

    def record_len(self) -> int:
        if self.spec.kind == "reg":
            return _align(self.core + len(self.xattrs), 8) + 8 * self.nchunks
        tail = self.size % BS if self.inline else 0
        return self.core + len(self.xattrs) + tail


def _v6_layout(inodes: list[_V6Inode], meta: int) -> int:
    """Assign inode offsets from ``meta`` (32-byte slots, no record crossing a block)."""
    off = meta
    for ino in inodes:
        if ino.spec.kind in ("dir", "symlink"):
            tail = ino.size % BS
            ino.inline = tail != 0 and ino.core + len(ino.xattrs) + tail <= BS
        length = ino.record_len()
        if off % BS + length > BS:
            off = _align(off, BS)
        ino.offset = off
        off = _align(off + length, 32)
    return off


def _v6_core(ino: _V6Inode, nid_of: dict[int, int], tree: _Tree, i_u: int) -> bytes:
    spec = ino.spec
    mode = _TYPE_BITS[spec.kind] | spec.mode
    layout = 4 if spec.kind == "reg" else (2 if ino.inline else 0)
    icount = (len(ino.xattrs) - 12) // 4 + 1 if ino.xattrs else 0
    nlink = tree.nlink(ino.path)
    if ino.compact:
        return struct.pack("<HHHHIIIIHH4x", layout << 1, icount, mode, nlink, ino.size,
                           spec.mtime, i_u, nid_of[id(spec)] & 0xFFFFFFFF, spec.uid, spec.gid)
    return struct.pack("<HHHHQIIIIQII16x", 1 | layout << 1, icount, mode, 0, ino.size, i_u,
                       nid_of[id(spec)] & 0xFFFFFFFF, spec.uid, spec.gid, spec.mtime,
                       spec.mtime_nsec, nlink)


def _v6_inodes(tree: _Tree, blob: _Blob, chunk_size: int, compact: bool
               ) -> tuple[list[_V6Inode], dict[int, list[tuple[int, _Chunk]]]]:
    """One ``_V6Inode`` per inode in breadth-first order, and each file's chunks."""
    seen: set[int] = set()
    inodes: list[_V6Inode] = []
    chunks: dict[int, list[tuple[int, _Chunk]]] = {}
    for path in tree.bfs():
        spec = tree.inode[path]
        if id(spec) in seen:
            continue
        seen.add(id(spec))
        small = (spec.uid | spec.gid) <= 0xFFFF and spec.mtime_nsec == 0 and \
            spec.mtime < 1 << 32 and tree.nlink(path) <= 0xFFFF
        size = {"reg": len(spec.data), "symlink": len(spec.target)}.get(spec.kind, 0)
        if spec.kind == "dir":
            names = [b".", b".."] + [c.rpartition("/")[2].encode() for c in tree.children[path]]
            size = len(_dir_blocks([(n, 0, 0) for n in sorted(names)]))
        ino = _V6Inode(path, spec, compact and small, _v6_xattrs(spec.xattrs), size)
        if spec.kind == "reg":
            chunks[id(spec)] = _file_chunks(blob, spec.data, chunk_size)
            ino.nchunks = len(chunks[id(spec)])
        inodes.append(ino)
    return inodes, chunks


def _v6_payload(ino: _V6Inode, tree: _Tree, nid_of: dict[int, int],
                chunk_size: int) -> tuple[bytes, int]:
    """(data: dirents or symlink target, the inode's ``i_u`` when it has no data blocks)."""
    spec = ino.spec
    if spec.kind == "dir":
        parent = ino.path.rpartition("/")[0]
        ents = [(b".", nid_of[id(spec)], 2), (b"..", nid_of[id(tree.inode[parent])], 2)]
        ents += [(c.rpartition("/")[2].encode(), nid_of[id(tree.inode[c])],
                  _FT[tree.inode[c].kind]) for c in tree.children[ino.path]]
        return _dir_blocks(sorted(ents)), 0
    if spec.kind == "symlink":
        return spec.target, 0
    if spec.kind in ("char", "block"):
        return b"", encode_rdev(*spec.rdev)
    if spec.kind == "reg":
        return b"", 0x20 | (chunk_size.bit_length() - 1 - 12)
    return b"", 0


def _v6_write_inode(boot: bytearray, ino: _V6Inode, tree: _Tree, nid_of: dict[int, int],
                    chunks: list[tuple[int, _Chunk]], chunk_size: int) -> None:
    """Write the inode, its xattrs, inline tail or chunk indexes; append its data blocks."""
    payload, i_u = _v6_payload(ino, tree, nid_of, chunk_size)
    head = len(payload) - (len(payload) % BS if ino.inline else 0)
    if head:
        i_u = len(boot) // BS
        boot += payload[:head].ljust(_align(head, BS), b"\0")
    core = _v6_core(ino, nid_of, tree, i_u) + ino.xattrs
    boot[ino.offset : ino.offset + len(core)] = core
    if ino.inline:
        tail = payload[head:]
        boot[ino.offset + len(core) : ino.offset + len(core) + len(tail)] = tail
    at = ino.offset + _align(len(core), 8)
    for i, (_, c) in enumerate(chunks):
        idx = struct.pack("<HHI", c.index & 0xFFFF, 1 | (c.index >> 16) << 8, c.uoff // BS)
        boot[at + 8 * i : at + 8 * i + 8] = idx


def _v6_tables(boot: bytearray, blob: _Blob, *, root_nid: int, inodes: int, chunk_table: int,
               chunk_size: int, compression: str, digest: str, prefetch: list[int]) -> None:
    """Fill in the superblocks, the device slot, the blob entry and the prefetch table."""
    blob_id = blob.blob_id().encode()
    table_size = 80 * len(blob.chunks)
    sb = struct.pack("<IIIBBHQQIIII16s16sIHHH", erofs.MAGIC, 0, 0x4000_0000, 12, 0, root_nid,
                     inodes, 0, 0, len(boot) // BS, 2, 0, bytes(16), bytes(16), 0xC, 0, 1, 11)
    boot[1024 : 1024 + len(sb)] = sb
    flags = _COMPRESSION_FLAG[compression] | _DIGEST_FLAG[digest] | 0x10
    pf_off = BS + 256
    boot[1152:1408] = struct.pack("<QQIIQQQI4x200x", flags, BS, 256, chunk_size, chunk_table,
                                  table_size, pf_off if prefetch else 0, 4 * len(prefetch))
    boot[1408:1536] = struct.pack("<64sII56x", blob_id, _align(blob.uoff, BS) // BS, 0)
    boot[BS : BS + 256] = struct.pack(
        "<64sIIIIIIQQIIQQQ32s32sQ8sI36x", blob_id, 0, chunk_size, len(blob.chunks),
        _COMPRESSION_ALGO[compression], _DIGEST_ALGO[digest], 0x1, len(blob.data), blob.uoff,
        0, 0, 0, 0, 0, bytes(32), bytes(32), 0, bytes(8), 0)
    boot[pf_off : pf_off + 4 * len(prefetch)] = struct.pack(f"<{len(prefetch)}I", *prefetch)


def write_v6(specs: list[Spec], *, chunk_size: int = BS, compression: str = "none",
             digest: str = "blake3", prefetch: tuple[str, ...] = (),
             compact: bool = True) -> Image:
    """A RAFS v6 bootstrap and blob for ``specs`` (see the module docstring).

    Layout: superblocks and the device slot in block 0, the blob and prefetch tables in
    block 1, ``meta_blkaddr`` 2 with the inodes from block 3 (so the root's nid is 128,
    as nydus-image makes it), then directory/symlink data blocks, then the chunk table.
    """
    tree = _Tree(specs)
    blob = _Blob(compression, digest, aligned=True)
    inodes, chunks = _v6_inodes(tree, blob, chunk_size, compact)
    meta = 2 * BS
    meta_end = _v6_layout(inodes, meta + BS)
    nid_of = {id(i.spec): (i.offset - meta) // 32 for i in inodes}
    boot = bytearray(_align(meta_end, BS))
    for ino in inodes:
        _v6_write_inode(boot, ino, tree, nid_of, chunks.get(id(ino.spec), []), chunk_size)
    chunk_table = len(boot)
    table = b"".join(_chunk_info(c, 0) for c in blob.chunks)
    boot += table.ljust(_align(len(table), BS), b"\0")
    _v6_tables(boot, blob, root_nid=nid_of[id(tree.inode[""])], inodes=len(inodes),
               chunk_table=chunk_table, chunk_size=chunk_size, compression=compression,
               digest=digest, prefetch=[nid_of[id(tree.inode[p])] for p in prefetch])
    return Image(bytes(boot), {blob.blob_id(): bytes(blob.data)})


# --- self-checks ---------------------------------------------------------------------------

SAMPLE = [
    Spec("etc", "dir", 0o755, mtime=1_700_000_000),
    Spec("etc/passwd", "reg", 0o644, uid=1, gid=2, data=b"root:x:0:0\n" * 500,
         xattrs={"user.note": b"hi", "security.selinux": b"ctx"}),
    Spec("etc/hosts", "hardlink", link="etc/passwd"),
    Spec("bin/sh", "symlink", 0o777, target=b"../usr/bin/busybox"),
    Spec("dev/null", "char", 0o666, rdev=(1, 3)),
    Spec("dev/sda1", "block", 0o660, rdev=(8, 300)),
    Spec("run/fifo", "fifo", 0o600),
    Spec("big", "reg", 0o600, uid=70000, mtime=5, mtime_nsec=7, data=os.urandom(3 * BS + 5)),
    Spec("empty", "reg", 0o644),
]


def test_v6_writer_output_is_a_valid_erofs_image(tmp_path: Path) -> None:
    """fsck.erofs accepts the writer's v6 output and extracts the same bytes."""
    image = write_v6(SAMPLE)
    ((_, blob),) = image.blobs.items()
    (tmp_path / "boot").write_bytes(image.bootstrap)
    (tmp_path / "blob").write_bytes(blob.ljust(_align(len(blob), BS), b"\0"))
    out = tmp_path / "out"
    res = subprocess.run(["fsck.erofs", f"--device={tmp_path / 'blob'}", f"--extract={out}",
                          str(tmp_path / "boot")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert (out / "etc" / "passwd").read_bytes() == SAMPLE[1].data
    assert (out / "big").read_bytes() == SAMPLE[7].data
    assert os.readlink(out / "bin" / "sh") == "../usr/bin/busybox"
    assert (out / "etc" / "hosts").read_bytes() == SAMPLE[1].data  # fsck 1.5 copies links
    nids = [_dump_nid(tmp_path, p) for p in ("/etc/hosts", "/etc/passwd")]
    assert nids[0] == nids[1]
    assert os.major(os.lstat(out / "dev" / "sda1").st_rdev) == 8
    assert os.minor(os.lstat(out / "dev" / "sda1").st_rdev) == 300


def _dump_nid(tmp_path: Path, path: str) -> str:
    res = subprocess.run(["dump.erofs", f"--device={tmp_path / 'blob'}", f"--path={path}",
                          str(tmp_path / "boot")], capture_output=True, text=True, check=True)
    return next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("NID:"))


def test_v5_writer_output_has_the_nydus_shape() -> None:
    image = write_v5(SAMPLE)
    boot = image.bootstrap
    assert boot[:4] == b"SFAR" and struct.unpack_from("<I", boot, 4)[0] == 0x500
    (blob_id,) = image.blobs
    assert blob_id.encode() in boot
