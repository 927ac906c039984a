"""What the RAFS writers share: the input tree, the data blob being built, chunk records.

The input is a flat list of ``Spec`` (one per name; parents before children is not
required: a missing parent directory is made with mode 0755, and takes the metadata of a
``dir`` spec for it that comes later). ``Tree`` resolves hard
links (``kind="hardlink"`` names an earlier path; both names then share one ``Spec``)
and sorts every directory's children by their UTF-8 bytes, as nydus-image does.

``BlobBuilder`` collects deduplicated chunks (by digest) into one data blob in the
order the writer adds them, compressing each chunk on its own (``none``, ``lz4_block``,
``zstd`` or ``gzip``) and keeping it uncompressed when compression does not shrink it
(the chunk's COMPRESSED flag then stays clear, as nydus does). ``finish`` seals the blob:
its bytes are the chunk data, optionally followed by one 512-byte tar header named
``image.blob`` (the payload-first "nydus tar" that nydus-snapshotter's converter puts in
a registry layer), and its id is the sha256 of those bytes, so a registry serves the
layer as ``sha256:<blob id>``.

Failure modes: ``InvalidArgument`` for input the writers cannot represent (an unknown
kind, compression or digest, a bad chunk size, a hard link to a missing or non-regular
path, a duplicate path, an invalid name); ``FormatError`` from the codecs only if a
Python codec package is missing.
"""

from __future__ import annotations

import hashlib
import struct
import tarfile
import zlib
from dataclasses import dataclass, field

import lz4.block  # type: ignore[import-untyped]
import zstandard

from snapshotter.errdefs import FormatError, InvalidArgument
from snapshotter.formats import chunkcodec
from snapshotter.formats.index import check_name

BS = 4096
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
KINDS = ("dir", "reg", "symlink", "char", "block", "fifo", "sock", "hardlink")
COMPRESSIONS = ("none", "lz4_block", "zstd", "gzip")
DIGESTS = ("blake3", "sha256")
COMPRESSION_FLAG = {"none": 0x1, "lz4_block": 0x2, "gzip": 0x40, "zstd": 0x80}
DIGEST_FLAG = {"blake3": 0x4, "sha256": 0x8}
COMPRESSION_ALGO = {"none": 0, "lz4_block": 1, "gzip": 2, "zstd": 3}
DIGEST_ALGO = {"blake3": 0, "sha256": 1}
TYPE_BITS = {"dir": 0o040000, "reg": 0o100000, "symlink": 0o120000, "char": 0o020000,
             "block": 0o060000, "fifo": 0o010000, "sock": 0o140000}
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
CHUNK_COMPRESSED = 0x1
BLOB_TRAILER_NAME = "image.blob"


@dataclass
class Spec:
    """One name in the tree. ``kind`` is one of ``KINDS``.

    ``data``: a regular file's bytes; ``target``: a symlink's target; ``link``: for
    ``hardlink``, the path of the regular file it names; ``rdev``: (major, minor) of a
    device; ``mtime`` seconds and ``mtime_nsec``; ``mode`` permission bits only.
    """

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
    """A written image: the bootstrap and ``{blob id: blob bytes}`` (one blob here)."""

    bootstrap: bytes
    blobs: dict[str, bytes]


def encode_rdev(major: int, minor: int) -> int:
    """A 32-bit Linux ``new_encode_dev`` device number (what RAFS stores)."""
    return (minor & 0xFF) | (major & 0xFFF) << 8 | (minor & ~0xFF) << 12


def align(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return -(-n // unit) * unit


def check_options(chunk_size: int, compression: str, digest: str) -> None:
    """Raise InvalidArgument unless the writer options are ones RAFS can carry."""
    if chunk_size & (chunk_size - 1) or not BS <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgument(f"chunk size must be a power of two in 4 KiB..16 MiB, "
                              f"got {chunk_size}")
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"unsupported compression {compression!r}")
    if digest not in DIGESTS:
        raise InvalidArgument(f"unsupported digest {digest!r}")


class Tree:
    """Paths, their inode (hard links share a ``Spec``) and sorted children.

    The root is ``""``. Raises InvalidArgument as described in the module docstring.
    """

    def __init__(self, specs: list[Spec]) -> None:
        self.inode: dict[str, Spec] = {"": Spec("", "dir", 0o755)}
        self.children: dict[str, list[str]] = {"": []}
        self._links: dict[int, int] = {}
        self._implicit: set[str] = set()
        for spec in specs:
            self._add(spec)
        for kids in self.children.values():
            kids.sort(key=lambda p: p.rpartition("/")[2].encode("utf-8", "surrogateescape"))

    def _add(self, spec: Spec) -> None:
        if spec.kind not in KINDS:
            raise InvalidArgument(f"{spec.path!r}: unknown kind {spec.kind!r}")
        if spec.path == "" and spec.kind == "dir":
            self.inode[""] = spec  # metadata of the root itself
            return
        parent, _, name = spec.path.rpartition("/")
        try:
            check_name(name)
        except FormatError as exc:
            raise InvalidArgument(f"{spec.path!r}: {exc}") from None
        if spec.path in self._implicit and spec.kind == "dir":
            self._implicit.discard(spec.path)
            self.inode[spec.path] = spec  # metadata for a directory made implicitly
            return
        if spec.path in self.inode:
            raise InvalidArgument(f"{spec.path!r} is listed twice")
        self._dir(parent)
        target = spec
        if spec.kind == "hardlink":
            linked = self.inode.get(spec.link)
            if linked is None or linked.kind == "dir":
                raise InvalidArgument(f"{spec.path!r}: hard link to {spec.link!r}, which is "
                                      "not an earlier non-directory")
            target = linked
        self.inode[spec.path] = target
        self._links[id(target)] = self._links.get(id(target), 0) + 1
        self.children[parent].append(spec.path)
        if spec.kind == "dir":
            self.children.setdefault(spec.path, [])

    def _dir(self, path: str) -> None:
        if path in self.inode:
            if self.inode[path].kind != "dir":
                raise InvalidArgument(f"{path!r} is not a directory but has children")
            return
        parent, _, _ = path.rpartition("/")
        self._dir(parent)
        self.inode[path] = Spec(path, "dir", 0o755)
        self._implicit.add(path)
        self.children[path] = []
        self.children[parent].append(path)

    def bfs(self) -> list[str]:
        """Every path, breadth first from the root, children in sorted order."""
        out, queue = [""], [""]
        while queue:
            for child in self.children[queue.pop(0)]:
                out.append(child)
                if self.inode[child].kind == "dir":
                    queue.append(child)
        return out

    def nlink(self, path: str) -> int:
        """Link count: 2 + subdirectories for a directory, else the number of names."""
        spec = self.inode[path]
        if spec.kind == "dir":
            return 2 + sum(self.inode[c].kind == "dir" for c in self.children[path])
        return self._links.get(id(spec), 1)

    def lookup(self, path: str) -> Spec:
        """The inode at ``path`` (leading/trailing ``/`` ignored); InvalidArgument if none."""
        spec = self.inode.get(path.strip("/"))
        if spec is None:
            raise InvalidArgument(f"no {path!r} in the tree")
        return spec

    def has_xattrs(self) -> bool:
        """Whether any inode carries xattrs (sets the HAS_XATTR superblock flag)."""
        return any(s.xattrs for s in self.inode.values())


def compress(data: bytes, compression: str) -> bytes:
    """One chunk compressed on its own (raw LZ4 block without a size prefix, as nydus)."""
    if compression == "zstd":
        return bytes(zstandard.ZstdCompressor().compress(data))
    if compression == "lz4_block":
        return bytes(lz4.block.compress(data, store_size=False))
    if compression == "gzip":
        c = zlib.compressobj(wbits=31)
        return c.compress(data) + c.flush()
    return data


@dataclass
class ChunkRec:
    """One stored chunk: digest bytes, flags, compressed/uncompressed size and offset."""

    digest: bytes
    flags: int
    csize: int
    usize: int
    coff: int
    uoff: int
    index: int


class BlobBuilder:
    """Accumulates deduplicated chunks; ``aligned`` pads uncompressed offsets to 4 KiB
    (RAFS v6: a chunk's block address is its uncompressed offset / 4096)."""

    def __init__(self, compression: str, digest: str, aligned: bool) -> None:
        self.compression, self.digest, self.aligned = compression, digest, aligned
        self.data = bytearray()
        self.uoff = 0
        self.by_digest: dict[bytes, ChunkRec] = {}
        self.chunks: list[ChunkRec] = []
        self._sealed: bytes | None = None

    def add(self, raw: bytes) -> ChunkRec:
        """Store ``raw`` (one chunk) unless an equal chunk is stored; return its record."""
        _, _, hexd = chunkcodec.compute_digest(raw, self.digest).partition(":")
        digest = bytes.fromhex(hexd)
        found = self.by_digest.get(digest)
        if found is not None:
            return found
        packed, flags = compress(raw, self.compression), CHUNK_COMPRESSED
        if self.compression == "none" or len(packed) >= len(raw):
            packed, flags = raw, 0
        if self.aligned and self.compression == "none":
            self.data.extend(bytes(self.uoff - len(self.data)))
        chunk = ChunkRec(digest, flags, len(packed), len(raw), len(self.data), self.uoff,
                         len(self.chunks))
        self.data.extend(packed)
        self.uoff += align(len(raw), BS) if self.aligned else len(raw)
        self.by_digest[digest] = chunk
        self.chunks.append(chunk)
        return chunk

    def file_chunks(self, data: bytes, chunk_size: int) -> list[tuple[int, ChunkRec]]:
        """Split a file into ``chunk_size`` pieces, store them, return (file offset, rec)."""
        return [(off, self.add(data[off : off + chunk_size]))
                for off in range(0, len(data), chunk_size)]

    def finish(self, trailer: bool) -> tuple[str, bytes]:
        """Seal the blob: (blob id, blob bytes); see the module docstring. Idempotent."""
        if self._sealed is None:
            body = bytes(self.data)
            if trailer:
                info = tarfile.TarInfo(BLOB_TRAILER_NAME)
                info.size, info.mode, info.type = len(body), 0o444, tarfile.REGTYPE
                body += info.tobuf(format=tarfile.USTAR_FORMAT)
            self._sealed = body
        return hashlib.sha256(self._sealed).hexdigest(), self._sealed


def chunk_info(c: ChunkRec, file_offset: int, blob_index: int = 0) -> bytes:
    """The 80-byte ``RafsV5ChunkInfo`` record of a chunk (v5 inodes, v6 chunk table)."""
    return struct.pack("<32sIIIIQQQII", c.digest, blob_index, c.flags, c.csize, c.usize,
                       c.coff, c.uoff, file_offset, c.index, 0)
