"""Decode and verify one nydus chunk: decompress a blob range, check the chunk digest.

A RAFS chunk is stored in its data blob as one independently compressed unit (no framing
beyond the compressor's own): ``none`` (the bytes as they are), ``lz4_block`` (a raw LZ4
block, no size prefix: nydus calls ``lz4::block::compress`` with ``prepend_size = false``),
``zstd`` (one zstd frame) or ``gzip`` (one gzip stream). Its digest is ``sha256`` or
``blake3`` of the uncompressed bytes, written ``"<algo>:<hex>"``.

``decode_chunk(data, chunk)`` has the ``Decoder`` signature of ``fs/reader.py`` and
``DECODERS`` holds the decoders this module adds to that table (``lz4_block``, ``zstd``;
``none`` too, which here also understands blake3 digests). Failure modes:

* ``DigestMismatch`` when the bytes do not hash to the promised digest;
* ``FormatError`` for corrupt or short compressed data, an output size other than the
  chunk's, an unknown compression or digest algorithm, a malformed digest string, a
  chunk larger than ``MAX_CHUNK_SIZE``, or a codec whose Python package (``zstandard``,
  ``lz4``, ``blake3``) is not installed.

Bounds (hostile blobs decide every byte given here):

* the declared uncompressed size is checked against ``MAX_CHUNK_SIZE`` (nydus
  ``RAFS_MAX_CHUNK_SIZE``, 16 MiB) before anything is allocated, and the compressed input
  against ``MAX_COMPRESSED_SIZE``;
* every decompression is bounded by the expected size plus one byte (to detect
  overruns): gzip through ``max_length``, zstd through a bounded streaming read with the
  decoder's window capped at ``MAX_ZSTD_WINDOW`` (a frame header declaring a huge content
  size or window is refused by libzstd, never allocated), lz4 into a buffer of exactly
  the declared size (the block decoder fails rather than write past it);
* whatever a codec library raises for bad input (``zlib.error``, ``ZstdError``,
  ``LZ4BlockError``, ``ValueError``, ``OverflowError``, ``MemoryError``) becomes FormatError.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import io
import re
import zlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from snapshotter.errdefs import DigestMismatch, FormatError
from snapshotter.formats.index import Chunk

COMPRESSIONS = ("none", "lz4_block", "zstd", "gzip")
DIGEST_ALGORITHMS = ("sha256", "blake3")
MAX_CHUNK_SIZE = 16 << 20  # nydus RAFS_MAX_CHUNK_SIZE
# The compressed form of a chunk: incompressible data grows by well under 1% in every
# codec (lz4: n/255 + 16), so twice the largest chunk is a generous ceiling; it matches
# ``rafs.MAX_COMPRESSED_CHUNK``, the largest range a bootstrap may declare.
MAX_COMPRESSED_SIZE = 2 * MAX_CHUNK_SIZE
# Largest zstd window the decoder accepts. A frame for a chunk of at most 16 MiB needs a
# window of at most 16 MiB (nydus compresses whole chunks with a known size, so libzstd
# shrinks the window to it); twice that leaves room for other encoders while keeping
# libzstd's allocation well below its default 128 MiB limit.
MAX_ZSTD_WINDOW = 2 * MAX_CHUNK_SIZE
# Exceptions the codec libraries raise for malformed or hostile input (mapped to FormatError).
_CODEC_ERRORS: tuple[type[BaseException], ...] = (zlib.error, ValueError, OverflowError,
                                                  MemoryError, EOFError)

_ZSTD_READ = 1 << 20  # bytes asked of the zstd reader at a time
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PACKAGES = {"zstandard": "zstd", "lz4.block": "lz4_block", "blake3": "blake3"}


def _module(name: str) -> ModuleType:
    """Import an optional codec package, or raise FormatError saying which one is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FormatError(
            f"{_PACKAGES.get(name, name)} support needs the Python package {name.split('.')[0]!r}"
        ) from None


def _check_size(size: int) -> None:
    """FormatError unless ``0 <= size <= MAX_CHUNK_SIZE`` (checked before any allocation)."""
    if not 0 <= size <= MAX_CHUNK_SIZE:
        raise FormatError(f"chunk size {size} outside 0..{MAX_CHUNK_SIZE}")


def _exact(out: bytes, size: int, what: str) -> bytes:
    if len(out) > size:
        raise FormatError(f"{what} chunk decodes to more than {size} bytes")
    if len(out) < size:
        raise FormatError(f"{what} chunk holds {len(out)} bytes, {size} expected")
    return out


def _zstd(data: bytes, size: int) -> bytes:
    """One zstd frame holding exactly ``size`` bytes; output never exceeds ``size + 1``."""
    zstd: Any = _module("zstandard")
    parts: list[bytes] = []
    got = 0
    try:
        decompressor = zstd.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        reader = decompressor.stream_reader(io.BytesIO(data), read_across_frames=False)
        while got <= size:
            part = reader.read(min(size + 1 - got, _ZSTD_READ))
            if not part:
                break
            parts.append(part)
            got += len(part)
    except (zstd.ZstdError, *_CODEC_ERRORS) as exc:
        raise FormatError(f"corrupt zstd chunk: {exc}") from None
    return _exact(b"".join(parts), size, "zstd")


def _lz4(data: bytes, size: int) -> bytes:
    """A raw LZ4 block of exactly ``size`` bytes, decoded into a ``size``-byte buffer."""
    block: Any = _module("lz4.block")
    if size == 0:
        if data:
            raise FormatError("lz4_block chunk of size 0 with data")
        return b""
    try:
        out = block.decompress(data, uncompressed_size=size)
    except (block.LZ4BlockError, *_CODEC_ERRORS) as exc:
        raise FormatError(f"corrupt lz4_block chunk: {exc}") from None
    return _exact(bytes(out), size, "lz4_block")


def _gzip(data: bytes, size: int) -> bytes:
    """One gzip stream of exactly ``size`` bytes, inflated with ``max_length = size + 1``."""
    try:
        out = zlib.decompressobj(wbits=31).decompress(data, size + 1)
    except _CODEC_ERRORS as exc:
        raise FormatError(f"corrupt gzip chunk: {exc}") from None
    return _exact(out, size, "gzip")


_DECOMPRESSORS: dict[str, Callable[[bytes, int], bytes]] = {
    "none": lambda data, size: _exact(data, size, "uncompressed"),
    "lz4_block": _lz4,
    "zstd": _zstd,
    "gzip": _gzip,
}


def decompress(data: bytes, compression: str, size: int) -> bytes:
    """Return the ``size`` uncompressed bytes held by ``data`` (one whole chunk).

    Raises FormatError for a ``size`` outside ``0..MAX_CHUNK_SIZE`` or compressed ``data``
    longer than ``MAX_COMPRESSED_SIZE`` (both before any decoding), an unknown compression,
    corrupt data, or output of another size.
    """
    _check_size(size)
    fn = _DECOMPRESSORS.get(compression)
    if fn is None:
        raise FormatError(f"unsupported chunk compression {compression!r}")
    if compression != "none" and len(data) > MAX_COMPRESSED_SIZE:
        raise FormatError(f"compressed chunk of {len(data)} bytes is over "
                          f"{MAX_COMPRESSED_SIZE}")
    return fn(bytes(data), size)


def compute_digest(data: bytes, algorithm: str) -> str:
    """``"<algorithm>:<hex>"`` of ``data``; FormatError unless it is sha256 or blake3."""
    if algorithm == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    if algorithm == "blake3":
        mod: Any = _module("blake3")
        return "blake3:" + str(mod.blake3(data).hexdigest())
    raise FormatError(f"unsupported digest algorithm {algorithm!r}")


def verify_digest(data: bytes, digest: str) -> None:
    """Raise DigestMismatch unless ``data`` hashes to ``digest`` (``""``: nothing to check).

    Raises FormatError for a malformed digest string or an unsupported algorithm.
    """
    if not digest:
        return
    algorithm, sep, want = digest.partition(":")
    if not sep or not _HEX64.fullmatch(want):
        raise FormatError(f"malformed chunk digest {digest!r}")
    got = compute_digest(data, algorithm)
    if not hmac.compare_digest(got, digest):
        raise DigestMismatch(f"chunk digest mismatch: want {digest}, got {got}")


def decode_chunk(data: bytes, chunk: Chunk) -> bytes:
    """Decode the blob range ``[chunk.blob_offset, chunk.blob_end)`` held in ``data``.

    Decompresses by ``chunk.compression``, skips ``chunk.inner_offset`` bytes, returns
    exactly ``chunk.size`` bytes after verifying ``chunk.digest``. Raises DigestMismatch or
    FormatError as described in the module docstring.
    """
    if chunk.inner_offset < 0:
        raise FormatError("negative inner offset")
    _check_size(chunk.size)
    if chunk.compression == "none":
        out = bytes(data[chunk.inner_offset : chunk.inner_offset + chunk.size])
        _exact(out, chunk.size, "uncompressed")
    else:
        out = decompress(data, chunk.compression, chunk.inner_offset + chunk.size)
        out = out[chunk.inner_offset :]
    verify_digest(out, chunk.digest)
    return out


DECODERS: Mapping[str, Callable[[bytes, Chunk], bytes]] = {
    "none": decode_chunk,
    "lz4_block": decode_chunk,
    "zstd": decode_chunk,
}
"""Decoders to merge into ``fs.reader.DEFAULT_DECODERS`` for RAFS layers."""
