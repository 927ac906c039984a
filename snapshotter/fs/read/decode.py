"""How a fetched chunk becomes its verified bytes: one decoder per ``Chunk.compression``.

A decoder takes the compressed range the chunk was fetched with and returns the chunk's
uncompressed, verified bytes (DigestMismatch when they do not match its digest,
FormatError for corrupt data). eStargz brings ``gzip`` (``estargz.read_chunk``); the RAFS
codecs (``none``, ``lz4_block``, ``zstd``) come from ``formats.chunkcodec``, imported on
first use since an eStargz daemon never needs zstd or lz4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from snapshotter.formats.index import Chunk

Decoder = Callable[[bytes, Chunk], bytes]
"""``decoder(compressed_range_bytes, chunk) -> verified uncompressed chunk bytes``."""


def decode_gzip(data: bytes, chunk: Chunk) -> bytes:
    """Decoder for eStargz gzip members (decompress, skip inner offset, verify)."""
    from snapshotter.formats import estargz  # the format module, imported where it is used

    return estargz.read_chunk(data, chunk)


def decode_rafs(data: bytes, chunk: Chunk) -> bytes:
    """Decoder for RAFS chunks (``none``, ``lz4_block``, ``zstd``; sha256 or blake3)."""
    from snapshotter.formats import chunkcodec

    return chunkcodec.decode_chunk(data, chunk)


DEFAULT_DECODERS: Mapping[str, Decoder] = {
    "gzip": decode_gzip, "none": decode_rafs, "lz4_block": decode_rafs, "zstd": decode_rafs}
