"""Hostile bootstrap layers (``bootstrap_tar.extract_bootstrap``, ``rafs_opener``): FormatError,
bounded memory.

Each layer is built from its description: a gzip or zstd bomb behind a tar header
declaring 2^40 bytes, a bootstrap declaring more than the limit (octal, base-256 or PAX),
2,000 members, a PAX header or GNU long name declaring 1 GiB, a bootstrap that is a
symlink, hard link, directory, device or sparse file, names with NUL bytes, bad
checksums, truncated streams. Memory is checked with ``tracemalloc`` (peak under 64 MiB);
no test measures time.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable
from typing import Literal

import pytest
import zstandard

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats import bootstrap_tar
from snapshotter.fs import rafs_opener
from tests.memory import peak_under
from tests.unit.test_fs_fakes import FakeFetcher

LIMIT = 1 << 20
BOOT = b"SFAR" + bytes(range(256)) * 40
END = bytes(1024)  # end-of-archive: two zero blocks
Format = Literal[0, 1, 2]  # tarfile.USTAR_FORMAT, GNU_FORMAT, PAX_FORMAT
Compress = Callable[..., bytes]




def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE,
           fmt: Format = tarfile.GNU_FORMAT, pax: dict[str, str] | None = None) -> bytes:
    """The header block(s) of one member (no data). GNU format writes sizes of 8 GiB and
    more in base-256; ``pax`` adds a PAX extended header (PAX format)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "elsewhere"
    if pax:
        info.pax_headers = pax
        fmt = tarfile.PAX_FORMAT
    return info.tobuf(fmt)


def member(name: str, data: bytes, fmt: Format = tarfile.GNU_FORMAT) -> bytes:
    """A whole member: header, data, padding."""
    return header(name, len(data), fmt=fmt) + data + bytes(-len(data) % 512)


def with_field(block: bytes, offset: int, raw: bytes) -> bytes:
    """``block`` with ``raw`` written at ``offset`` and its checksum recomputed."""
    out = bytearray(block)
    out[offset : offset + len(raw)] = raw
    out[148:156] = b" " * 8
    out[148:156] = b"%06o\0 " % sum(out)
    return bytes(out)


def gzip_stream(*parts: bytes, zeros: int = 0) -> bytes:
    """gzip of ``parts`` followed by ``zeros`` zero bytes (compressed piecewise)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(p) for p in parts]
    block = bytes(1 << 20)
    out += [c.compress(block) for _ in range(zeros >> 20)]
    return b"".join(out) + c.flush()


def zstd_stream(*parts: bytes, zeros: int = 0) -> bytes:
    c = zstandard.ZstdCompressor(level=3).compressobj()
    out = [c.compress(p) for p in parts]
    block = bytes(1 << 20)
    out += [c.compress(block) for _ in range(zeros >> 20)]
    return b"".join(out) + c.flush()


def test_max_bootstrap_bytes_is_256_mib_everywhere() -> None:
    assert bootstrap_tar.MAX_BOOTSTRAP_BYTES == 256 << 20
    assert rafs_opener.MAX_BOOTSTRAP_BYTES == bootstrap_tar.MAX_BOOTSTRAP_BYTES


@pytest.mark.parametrize("compress", [gzip_stream, zstd_stream], ids=["gzip", "zstd"])
def test_bomb_behind_a_huge_member_is_refused_once_it_inflates_past_the_cap(
        compress: Compress) -> None:
    """A member declaring 2^40 bytes of zeros (64 MiB of them really there), then the
    bootstrap: the stream is refused at LIMIT + TAR_OVERHEAD_BYTES, read piece by piece."""
    bomb = compress(header("image/junk", 1 << 40), zeros=64 << 20)
    assert len(bomb) < 1 << 20
    with peak_under(), pytest.raises(LimitExceeded, match="inflates to more than"):
        bootstrap_tar.extract_bootstrap(bomb, LIMIT)


@pytest.mark.parametrize("compress", [gzip_stream, zstd_stream], ids=["gzip", "zstd"])
def test_bomb_after_the_bootstrap_is_refused_too(compress: Compress) -> None:
    """The bootstrap first, then a member of 64 MiB of zeros: still over the cap."""
    bomb = compress(member("image/image.boot", BOOT), header("pad", 64 << 20),
                    zeros=64 << 20)
    with peak_under(), pytest.raises(LimitExceeded, match="inflates to more than"):
        bootstrap_tar.extract_bootstrap(bomb, LIMIT)


@pytest.mark.parametrize("size_header", [
    header("image/image.boot", 1 << 40),  # base-256 (GNU)
    header("image/image.boot", LIMIT + 1),  # octal
    header("image/image.boot", 0, pax={"size": str(1 << 40)}),  # PAX size record
], ids=["base256", "octal", "pax"])
def test_bootstrap_declaring_more_than_the_limit_is_refused_before_reading(
        size_header: bytes) -> None:
    layer = gzip_stream(size_header, zeros=32 << 20)
    with peak_under(4 << 20), pytest.raises(LimitExceeded, match="is over"):
        bootstrap_tar.extract_bootstrap(layer, LIMIT)


def test_negative_base256_size_is_refused() -> None:
    block = with_field(header("image/image.boot", 10), 124, b"\xff" * 12)
    with pytest.raises(FormatError, match="invalid size"):
        bootstrap_tar.extract_bootstrap(block + bytes(512) + END, LIMIT)


def test_too_many_members_are_refused() -> None:
    layer = b"".join(header(f"f{i}") for i in range(2000)) + member("image/image.boot", BOOT)
    with peak_under(), pytest.raises(LimitExceeded, match="more than 1024 tar headers"):
        bootstrap_tar.extract_bootstrap(gzip_stream(layer), LIMIT)


@pytest.mark.parametrize("kind", [b"x", b"L"], ids=["pax", "gnu-long-name"])
def test_special_header_declaring_1_gib_is_refused_before_reading(kind: bytes) -> None:
    block = with_field(header("././@LongLink", 1 << 30), 156, kind)
    with peak_under(4 << 20), pytest.raises(LimitExceeded, match="header of"):
        bootstrap_tar.extract_bootstrap(gzip_stream(block, zeros=8 << 20), LIMIT)


@pytest.mark.parametrize("records", [b"99 path=x\n", b"x path=a\n", b"5 =a\n", b"7 patha\n",
                                     b"12 path=abc\n\0\0x"])
def test_malformed_pax_records_are_refused(records: bytes) -> None:
    block = with_field(header("pax", len(records)), 156, b"x")
    layer = block + records + bytes(-len(records) % 512) + member("image/image.boot", BOOT)
    with pytest.raises(FormatError, match="PAX"):
        bootstrap_tar.extract_bootstrap(layer + END, LIMIT)


@pytest.mark.parametrize(("kind", "what"), [
    (tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hard link"),
    (tarfile.DIRTYPE, "directory"), (tarfile.CHRTYPE, "character device"),
    (tarfile.FIFOTYPE, "FIFO"), (b"V", "special file"),
])
def test_bootstrap_name_on_a_non_regular_member_is_refused(kind: bytes, what: str) -> None:
    layer = member("image.boot", BOOT) + header("./image/image.boot", 0, kind) + END
    with pytest.raises(FormatError, match=f"is a {what}, not a regular file"):
        bootstrap_tar.extract_bootstrap(layer, LIMIT)


def test_sparse_members_are_refused() -> None:
    gnu_sparse = with_field(header("image/image.boot", len(BOOT)), 156, b"S")
    with pytest.raises(FormatError, match="sparse"):
        bootstrap_tar.extract_bootstrap(gnu_sparse + BOOT + END, LIMIT)
    pax_sparse = header("image/image.boot", len(BOOT), pax={"GNU.sparse.major": "1"})
    with pytest.raises(FormatError, match="not a regular file"):
        bootstrap_tar.extract_bootstrap(pax_sparse + BOOT + bytes(-len(BOOT) % 512) + END, LIMIT)


def test_names_with_nul_bytes_are_refused() -> None:
    layer = header("x", 0, pax={"path": "image/image.boot\0.tmp"}) + END
    with pytest.raises(FormatError, match="NUL"):
        bootstrap_tar.extract_bootstrap(layer, LIMIT)


@pytest.mark.parametrize("name", ["../image/image.boot", "image/../image.boot",
                                  "image/image.boot/x", "x/image.boot"])
def test_names_that_only_resemble_the_bootstrap_are_not_it(name: str) -> None:
    with pytest.raises(FormatError, match="holds no"):
        bootstrap_tar.extract_bootstrap(member(name, BOOT) + END, LIMIT)


def test_bad_checksum_and_truncations_are_refused() -> None:
    good = member("image/image.boot", BOOT) + END
    bad = bytearray(good)
    bad[0] ^= 1
    cases = {
        "checksum": bytes(bad),
        "header": good[:300],
        "data": good[:512 + 100],
        "gzip": gzip_stream(good)[:-20],
        "gzip garbage between members": gzip_stream(good[:700]) + b"garbage"
                                        + gzip_stream(good[700:]),
        "not a tar": gzip_stream(b"not a tar at all" * 100),
    }
    for what, layer in cases.items():
        with pytest.raises(FormatError):
            bootstrap_tar.extract_bootstrap(layer, LIMIT)
            pytest.fail(what)


def test_accepted_layouts_still_work() -> None:
    """Concatenated gzip members with NUL padding, PAX and GNU long names, a file object."""
    long_dir = "d" * 150
    tar = (member(f"{long_dir}/x", b"1") + member(f"{long_dir}/y", b"2", fmt=tarfile.PAX_FORMAT)
           + member("/./image//image.boot", BOOT) + END)
    half = len(tar) // 2
    layer = gzip_stream(tar[:half]) + bytes(10) + gzip_stream(tar[half:]) + bytes(10)
    assert bootstrap_tar.extract_bootstrap(layer, LIMIT) == BOOT
    assert bootstrap_tar.extract_bootstrap(io.BytesIO(zstd_stream(tar)), LIMIT) == BOOT
    assert bootstrap_tar.extract_bootstrap(tar[:-1024], LIMIT) == BOOT  # no end-of-archive blocks
    last_wins = member("image/image.boot", b"old") + member("image/image.boot", BOOT) + END
    assert bootstrap_tar.extract_bootstrap(last_wins, LIMIT) == BOOT


def test_untar_layer_is_bounded() -> None:
    bomb = gzip_stream(zeros=64 << 20)
    with peak_under(), pytest.raises(LimitExceeded, match="inflates to more than"):
        bootstrap_tar.untar_layer(bomb, 8 << 20)
    assert bootstrap_tar.untar_layer(gzip_stream(b"abc")) == b"abc"


async def test_open_layer_refuses_a_bomb_layer() -> None:
    """A junk member declaring 2^40 bytes, then 288 MiB of zeros in 18 gzip members: over
    MAX_BOOTSTRAP_BYTES + TAR_OVERHEAD_BYTES, so refused while streaming."""
    bomb = gzip_stream(header("image/junk", 1 << 40)) + gzip_stream(zeros=16 << 20) * 18
    with peak_under(), pytest.raises(LimitExceeded, match="inflates to more than"):
        await rafs_opener.open_layer(FakeFetcher(bomb), None)


async def test_open_layer_refuses_an_oversized_blob_before_fetching_it() -> None:
    class Huge(FakeFetcher):
        async def size(self) -> int:
            return rafs_opener.MAX_BOOTSTRAP_BYTES + 1

    fetcher = Huge(b"")
    with pytest.raises(LimitExceeded, match="is over"):
        await rafs_opener.open_layer(fetcher, None)
    assert fetcher.calls == []
