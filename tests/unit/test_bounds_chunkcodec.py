"""Hostile chunks for ``formats/chunkcodec.py``: every one is a FormatError, cheaply.

Each input is built from its description (a zstd frame header declaring 2^40 bytes, a
gzip stream inflating to 1 GiB, an LZ4 block lying about its size, ...). The memory a
decode may use is checked with ``tracemalloc`` (Python allocations: the decoded bytes
and everything built from them); no test measures time.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import lz4.block  # type: ignore[import-untyped]
import pytest
import zstandard

from snapshotter.errdefs import FormatError
from snapshotter.formats import chunkcodec
from snapshotter.formats.index import Chunk
from tests.memory import peak_under

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"




def zstd_frame(content_size: int, *, single_segment: bool = True, window_log: int = 20,
               rle_blocks: int = 1) -> bytes:
    """A zstd frame whose header declares ``content_size`` (8-byte field), then
    ``rle_blocks`` RLE blocks of 128 KiB each (4 input bytes per 128 KiB of output)."""
    descriptor = 0xC0 | (0x20 if single_segment else 0)  # FCS field of 8 bytes
    header = ZSTD_MAGIC + bytes([descriptor])
    if not single_segment:
        header += bytes([(window_log - 10) << 3])
    header += struct.pack("<Q", content_size)
    blocks = b""
    for i in range(rle_blocks):
        last = 1 if i + 1 == rle_blocks else 0
        blocks += struct.pack("<I", (128 << 10) << 3 | 1 << 1 | last)[:3] + b"A"
    return header + blocks


def gzip_of_zeros(n: int) -> bytes:
    """A gzip stream of ``n`` zero bytes (about n / 1000 bytes long), built piecewise."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    parts = [c.compress(zeros) for _ in range(n >> 20)]
    return b"".join(parts) + c.flush()


def _chunk(compression: str, size: int, inner: int = 0) -> Chunk:
    return Chunk(0, size, 0, 0, inner, "", compression, "blob")


def test_zstd_frame_declaring_2_pow_40_bytes_is_refused_without_allocating_it() -> None:
    frame = zstd_frame(1 << 40)
    with peak_under(), pytest.raises(FormatError):
        chunkcodec.decompress(frame, "zstd", 4096)


def test_zstd_frame_declaring_2_pow_40_with_small_window_is_cut_at_the_chunk_size() -> None:
    """Not single-segment: libzstd would stream 2^40 bytes; the read stops at size + 1."""
    frame = zstd_frame(1 << 40, single_segment=False, window_log=17, rle_blocks=8192)
    with peak_under(), pytest.raises(FormatError, match="more than"):
        chunkcodec.decompress(frame, "zstd", 4 << 20)


def test_zstd_frame_with_a_huge_window_is_refused() -> None:
    """A 1 GiB window (windowLog 30) is over MAX_ZSTD_WINDOW: refused, never allocated."""
    frame = zstd_frame(1 << 30, single_segment=False, window_log=30)
    with pytest.raises(FormatError, match="zstd"):
        chunkcodec.decompress(frame, "zstd", 4096)


def test_real_zstd_chunk_of_max_size_still_decodes() -> None:
    data = bytes(range(256)) * (chunkcodec.MAX_CHUNK_SIZE // 256)
    packed = zstandard.ZstdCompressor(level=1).compress(data)
    assert chunkcodec.decompress(packed, "zstd", len(data)) == data


def test_gzip_bomb_is_cut_at_the_chunk_size() -> None:
    bomb = gzip_of_zeros(128 << 20)
    with peak_under(), pytest.raises(FormatError, match="more than"):
        chunkcodec.decompress(bomb, "gzip", 4 << 20)


@pytest.mark.parametrize("declared", [4096, (1 << 20) + 1])
def test_lz4_block_lying_about_its_size(declared: int) -> None:
    """A block holding 1 MiB, declared smaller (no room) or larger (short output)."""
    block = lz4.block.compress(bytes(1 << 20), store_size=False)
    with peak_under(), pytest.raises(FormatError):
        chunkcodec.decompress(block, "lz4_block", declared)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "lz4_block", "none"])
@pytest.mark.parametrize("size", [chunkcodec.MAX_CHUNK_SIZE + 1, 1 << 40, -1])
def test_declared_size_over_the_limit_is_refused_before_any_allocation(
        compression: str, size: int) -> None:
    with peak_under(4 << 20), pytest.raises(FormatError, match="outside"):
        chunkcodec.decompress(b"\0" * 64, compression, size)
    with peak_under(4 << 20), pytest.raises(FormatError):
        chunkcodec.decode_chunk(b"\0" * 64, _chunk(compression, size))


def test_inner_offset_cannot_push_the_size_over_the_limit() -> None:
    chunk = _chunk("zstd", 4096, inner=chunkcodec.MAX_CHUNK_SIZE)
    with pytest.raises(FormatError, match="outside"):
        chunkcodec.decode_chunk(zstd_frame(1 << 40), chunk)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "lz4_block"])
def test_compressed_input_over_the_limit_is_refused(compression: str) -> None:
    data = bytes(chunkcodec.MAX_COMPRESSED_SIZE + 1)
    with pytest.raises(FormatError, match="compressed chunk"):
        chunkcodec.decompress(data, compression, 4096)


@pytest.mark.parametrize("exc", [ValueError("v"), OverflowError("o"), MemoryError(),
                                 zlib.error("z")])
@pytest.mark.parametrize(("module", "attr", "compression"), [
    (lz4.block, "decompress", "lz4_block"),
    (zstandard, "ZstdDecompressor", "zstd"),
    (zlib, "decompressobj", "gzip"),
])
def test_any_codec_exception_becomes_format_error(
        monkeypatch: pytest.MonkeyPatch, exc: BaseException, module: object, attr: str,
        compression: str) -> None:
    def boom(*args: object, **kwargs: object) -> Callable[..., bytes]:
        raise exc

    monkeypatch.setattr(module, attr, boom)
    with pytest.raises(FormatError):
        chunkcodec.decompress(b"\0" * 16, compression, 4096)
