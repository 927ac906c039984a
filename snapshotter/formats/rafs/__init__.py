"""Nydus RAFS bootstraps (v5 and v6) as a ``LayerIndex``: dispatch and shared pieces.

``build_index(bootstrap)`` sniffs the version from the first bytes (``detect.py``, §5.4) and
hands the bytes to ``v5.build_index`` or ``v6.build_index``. Both produce a
validated ``LayerIndex`` (format ``"rafs-v5"`` / ``"rafs-v6"``) whose regular files carry
chunks naming their data blob by id (``Chunk.blob``), the compressed range in that blob,
the compression (``none``, ``lz4_block``, ``gzip`` or ``zstd``) and the chunk digest
(``sha256:<hex>`` or ``blake3:<hex>``).

``common`` holds what both versions share: the RAFS superblock flag bits, the
80-byte chunk-info record (``RafsV5ChunkInfo``, also used by v6's chunk table),
``BlobInfo``, a bounds-checked ``unpack`` and ``TreeBuilder``, which turns names and
nodes into the overlay presentation the FUSE daemon serves:

* OCI whiteouts stored as files (nydus-image keeps them so in a single layer's bootstrap
  built with the default ``--whiteout-spec oci``): ``.wh.NAME`` becomes a character device
  0/0 named ``NAME`` (mode 0, owner and mtime of the whiteout) unless a real ``NAME``
  exists in that directory; ``.wh..wh..opq`` sets ``trusted.overlay.opaque = y`` on its
  directory; other ``.wh..wh.*`` names (AUFS metadata) are dropped with what is under them;
  a directory named ``.wh.*`` is a FormatError. Overlayfs-style whiteouts (char 0/0 and
  the opaque xattr, ``--whiteout-spec overlayfs``) pass through unchanged. A bootstrap
  merged from several layers has no whiteouts left.
* ``nlink`` counts names (directories: 2 plus subdirectories), as in the eStargz reader,
  so a hard-linked file is one node listed under each of its names.
* ``prefetch_inos`` lists the regular files named by the prefetch table, a directory
  standing for every regular file below it (nydus prefetches a directory's descendants);
  entries that name no inode of the tree are ignored, since the table is only a hint.
* Sockets, which a ``LayerIndex`` cannot represent (tar cannot carry them either), are
  left out.

Every parser here raises only FormatError (never IndexError, struct.error, ...).

Bounds shared by both versions: chunk sizes are powers of two in 4 KiB..16 MiB
(``MAX_CHUNK_SIZE``, nydus ``RAFS_MAX_CHUNK_SIZE``), a chunk's compressed size is at
most ``MAX_COMPRESSED_CHUNK``, symlink targets at most ``MAX_SYMLINK`` bytes, and the
tree at most ``MAX_DEPTH`` directories deep (checked iteratively by ``TreeBuilder``;
nothing here recurses). Everything else a bootstrap declares is checked against its
length by the version modules before it drives a loop or an allocation.
"""

from __future__ import annotations

from snapshotter.formats import detect
from snapshotter.formats.index import LayerIndex
from snapshotter.formats.rafs import v5 as rafs_v5
from snapshotter.formats.rafs import v6 as rafs_v6
from snapshotter.formats.rafs.common import (  # the shared names, as rafs.NAME
    CHUNK_BATCH,
    CHUNK_COMPRESSED,
    CHUNK_ENCRYPTED,
    CHUNK_HAS_CRC32,
    CHUNK_HOLE,
    CHUNK_INFO,
    COMPRESSION_BY_ALGO,
    DIGEST_BY_ALGO,
    FLAG_COMPRESSION_GZIP,
    FLAG_COMPRESSION_LZ4,
    FLAG_COMPRESSION_NONE,
    FLAG_COMPRESSION_ZSTD,
    FLAG_ENCRYPTION_AES_128_XTS,
    FLAG_ENCRYPTION_NONE,
    FLAG_EXPLICIT_UID_GID,
    FLAG_HAS_XATTR,
    FLAG_HASH_BLAKE3,
    FLAG_HASH_SHA256,
    FLAG_INLINED_CHUNK_DIGEST,
    FLAG_NAMES,
    FLAG_TARFS_MODE,
    KNOWN_FLAGS,
    MAX_CHUNK_SIZE,
    MAX_COMPRESSED_CHUNK,
    MAX_DEPTH,
    MAX_SYMLINK,
    MIN_CHUNK_SIZE,
    OPAQUE_XATTR,
    RAFS_V5,
    RAFS_V6,
    S_IFSOCK,
    BlobInfo,
    ChunkInfo,
    TreeBuilder,
    check_blob_id,
    check_range,
    compression_from_flags,
    digest_from_flags,
    flag_names,
    ints,
    kind_of,
    make_chunk,
    parse_chunk_info,
    split_rdev,
    unpack,
)


def build_index(bootstrap: bytes) -> LayerIndex:
    """Parse a whole RAFS v5 or v6 bootstrap into a validated ``LayerIndex``.

    Raises FormatError for anything that is not a well-formed bootstrap: wrong magic,
    truncation, offsets or counts past the end, directory cycles, trees deeper than
    ``MAX_DEPTH``, invalid names, unsupported features (encrypted, batch, zran, hole
    chunks, tarfs). Time and memory are linear in ``len(bootstrap)``.
    """
    version = detect.detect_fs_version(bootstrap)
    if version == RAFS_V5:
        return rafs_v5.build_index(bootstrap)
    return rafs_v6.build_index(bootstrap)


def parse_blob_table(bootstrap: bytes) -> list[BlobInfo]:
    """The data blobs a v5 or v6 bootstrap names, in blob-index order (FormatError if bad)."""
    if detect.detect_fs_version(bootstrap) == RAFS_V5:
        return rafs_v5.parse_blob_table(bootstrap, rafs_v5.parse_superblock(bootstrap))
    sb, ext = rafs_v6.parse_superblocks(bootstrap)
    return rafs_v6.parse_blob_table(bootstrap, sb, ext)


__all__ = [
    "CHUNK_BATCH",
    "CHUNK_COMPRESSED",
    "CHUNK_ENCRYPTED",
    "CHUNK_HAS_CRC32",
    "CHUNK_HOLE",
    "CHUNK_INFO",
    "COMPRESSION_BY_ALGO",
    "DIGEST_BY_ALGO",
    "FLAG_COMPRESSION_GZIP",
    "FLAG_COMPRESSION_LZ4",
    "FLAG_COMPRESSION_NONE",
    "FLAG_COMPRESSION_ZSTD",
    "FLAG_ENCRYPTION_AES_128_XTS",
    "FLAG_ENCRYPTION_NONE",
    "FLAG_EXPLICIT_UID_GID",
    "FLAG_HASH_BLAKE3",
    "FLAG_HASH_SHA256",
    "FLAG_HAS_XATTR",
    "FLAG_INLINED_CHUNK_DIGEST",
    "FLAG_NAMES",
    "FLAG_TARFS_MODE",
    "KNOWN_FLAGS",
    "MAX_CHUNK_SIZE",
    "MAX_COMPRESSED_CHUNK",
    "MAX_DEPTH",
    "MAX_SYMLINK",
    "MIN_CHUNK_SIZE",
    "OPAQUE_XATTR",
    "RAFS_V5",
    "RAFS_V6",
    "S_IFSOCK",
    "BlobInfo",
    "ChunkInfo",
    "TreeBuilder",
    "build_index",
    "check_blob_id",
    "check_range",
    "compression_from_flags",
    "digest_from_flags",
    "flag_names",
    "ints",
    "kind_of",
    "make_chunk",
    "parse_blob_table",
    "parse_chunk_info",
    "split_rdev",
    "unpack",
]
