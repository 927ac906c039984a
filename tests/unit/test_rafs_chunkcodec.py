"""chunkcodec: decompress none / lz4_block / zstd / gzip chunks, verify sha256 / blake3.

The nydus fixtures only hold uncompressed sha256 (v5) and zstd blake3 (v6) chunks, so
every codec and digest is also exercised here with data made by the reference libraries.
"""

from __future__ import annotations

import hashlib
import os
import zlib

import blake3
import lz4.block  # type: ignore[import-untyped]
import pytest
import zstandard

from snapshotter.errdefs import DigestMismatch, FormatError
from snapshotter.formats import chunkcodec
from snapshotter.formats.index import Chunk

DATA = os.urandom(3000) + b"abc" * 5000


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=31)
    return c.compress(data) + c.flush()


COMPRESSORS = {
    "none": lambda d: d,
    "lz4_block": lambda d: lz4.block.compress(d, store_size=False),
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "gzip": _gzip,
}


def _chunk(compression: str, digest: str, size: int = len(DATA), inner: int = 0) -> Chunk:
    return Chunk(0, size, 0, 0, inner, digest, compression, "blob")


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
@pytest.mark.parametrize("algo", ["sha256", "blake3"])
def test_decode_round_trip(compression: str, algo: str) -> None:
    packed = COMPRESSORS[compression](DATA)
    digest = chunkcodec.compute_digest(DATA, algo)
    assert chunkcodec.decode_chunk(packed, _chunk(compression, digest)) == DATA
    assert chunkcodec.decompress(packed, compression, len(DATA)) == DATA


def test_digests_match_reference_implementations() -> None:
    assert chunkcodec.compute_digest(DATA, "sha256") == "sha256:" + hashlib.sha256(DATA).hexdigest()
    assert chunkcodec.compute_digest(DATA, "blake3") == "blake3:" + blake3.blake3(DATA).hexdigest()
    with pytest.raises(FormatError, match="unsupported digest"):
        chunkcodec.compute_digest(DATA, "md5")


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
@pytest.mark.parametrize("algo", ["sha256", "blake3"])
def test_digest_mismatch(compression: str, algo: str) -> None:
    packed = COMPRESSORS[compression](DATA)
    wrong = chunkcodec.compute_digest(DATA[:-1] + b"!", algo)
    with pytest.raises(DigestMismatch, match="mismatch"):
        chunkcodec.decode_chunk(packed, _chunk(compression, wrong))


@pytest.mark.parametrize("compression", ["lz4_block", "zstd", "gzip"])
def test_corrupt_and_wrongly_sized_data(compression: str) -> None:
    packed = COMPRESSORS[compression](DATA)
    for size in (len(DATA) - 1, len(DATA) + 1):
        with pytest.raises(FormatError):
            chunkcodec.decompress(packed, compression, size)
    with pytest.raises(FormatError):
        chunkcodec.decompress(b"\xff" * 64, compression, len(DATA))
    with pytest.raises(FormatError):
        chunkcodec.decompress(packed[: len(packed) // 2], compression, len(DATA))


def test_bounds_and_bad_parameters() -> None:
    with pytest.raises(FormatError, match="outside"):
        chunkcodec.decompress(b"", "zstd", chunkcodec.MAX_CHUNK_SIZE + 1)
    with pytest.raises(FormatError, match="unsupported chunk compression"):
        chunkcodec.decompress(b"", "brotli", 0)
    with pytest.raises(FormatError, match="malformed"):
        chunkcodec.verify_digest(b"", "sha256:xyz")
    with pytest.raises(FormatError, match="malformed"):
        chunkcodec.verify_digest(b"", "nocolon")
    with pytest.raises(FormatError, match="unsupported digest"):
        chunkcodec.verify_digest(b"", "sha512:" + "0" * 64)
    with pytest.raises(FormatError, match="holds"):
        chunkcodec.decode_chunk(b"abc", _chunk("none", "", size=4))
    with pytest.raises(FormatError, match="negative"):
        chunkcodec.decode_chunk(b"abc", _chunk("none", "", size=1, inner=-1))
    chunkcodec.verify_digest(b"anything", "")  # no digest, nothing to check


def test_zstd_bomb_is_bounded() -> None:
    """A frame claiming a huge content size decodes only up to the chunk size + 1."""
    bomb = zstandard.ZstdCompressor().compress(bytes(8 << 20))
    with pytest.raises(FormatError, match="more than"):
        chunkcodec.decompress(bomb, "zstd", 4096)


def test_inner_offset_and_decoder_table() -> None:
    packed = COMPRESSORS["zstd"](DATA)
    tail = DATA[100:]
    chunk = Chunk(0, len(tail), 0, len(packed), 100, chunkcodec.compute_digest(tail, "sha256"),
                  "zstd")
    assert chunkcodec.DECODERS["zstd"](packed, chunk) == tail
    assert set(chunkcodec.DECODERS) == {"none", "lz4_block", "zstd"}
