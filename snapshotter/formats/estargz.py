"""eStargz (and legacy stargz) blobs: footer, TOC extraction, verification, chunk reads.

An eStargz blob is a ``tar.gz`` made of many concatenated gzip members; its last member is
an empty gzip member (the *footer*) whose RFC 1952 Extra field names the compressed offset
of the member holding the TOC (``stargz.index.json``). See protocol-reference §4.

Everything here except ``fetch_toc``/``open_layer`` is a pure function over bytes. The
parsers raise only ``FormatError`` (and its subclass ``DigestMismatch``), never
``IndexError``, ``zlib.error``, ``UnicodeDecodeError`` or the like, and every
decompression is bounded by an explicit output limit, so hostile input can neither crash
nor exhaust memory.

The TOC JSON is decoded by ``estargz_toc.parse_toc`` and turned into a ``LayerIndex`` by
``estargz_tree.build_index``; this module re-exports both, so callers import only it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
import zlib
from dataclasses import dataclass

from snapshotter.errdefs import DigestMismatch, FormatError, LimitExceeded
from snapshotter.formats.digests import sha256_digest
from snapshotter.formats.estargz_toc import DEFAULT_MAX_ENTRIES, TocEntry, parse_toc
from snapshotter.formats.estargz_tree import (
    MAX_DEFLATE_RATIO,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    build_index,
    index_from_entries,
)
from snapshotter.formats.index import Chunk, LayerIndex
from snapshotter.formats.limits import MAX_TOC_BYTES, TocLimits
from snapshotter.registry.base import BlobFetcher

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_TOC_BYTES",
    "ESTARGZ_FOOTER_SIZE",
    "FOOTER_MAX",
    "LEGACY_FOOTER_SIZE",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_TAR_NAME",
    "Footer",
    "TocEntry",
    "build_index",
    "extract_toc",
    "fetch_toc",
    "index_from_entries",
    "open_layer",
    "parse_footer",
    "parse_toc",
    "read_chunk",
    "toc_digest",
    "verify_toc",
]

FOOTER_MAX = 51
"""The largest footer among the formats we recognise; fetch this many tail bytes."""
ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
EXTERNAL_TOC_FOOTER_SIZE = 46
ZSTD_CHUNKED_FOOTER_SIZE = 40

DEFAULT_MAX_TOC_BYTES = MAX_TOC_BYTES
"""Refuse TOC JSON larger than this (stargz's own reader has no limit; 64 MiB is ~300k
entries, far beyond real layers)."""

_ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
_GZIP_MAGIC = b"\x1f\x8b"
_FEXTRA = 4
_HEX16 = re.compile(rb"[0-9a-fA-F]{16}")
_TAR_BLOCK = 512
# Slack on top of the TOC JSON for the tar header(s), padding and end-of-archive blocks.
_TOC_MEMBER_SLACK = 1 << 20


@dataclass(frozen=True, slots=True)
class Footer:
    """A parsed footer.

    ``toc_offset``: compressed offset of the gzip member holding the TOC tar entry.
    ``footer_size``: bytes the footer occupies at the end of the blob (51 or 47).
    ``kind``: ``"estargz"`` or ``"stargz-legacy"``.
    """

    toc_offset: int
    footer_size: int
    kind: str

    def toc_range(self, blob_size: int) -> tuple[int, int]:
        """The half-open compressed range ``[toc_offset, blob_size - footer_size)``.

        Raises FormatError if that range is empty or does not fit in ``blob_size``.
        """
        end = blob_size - self.footer_size
        if not 0 <= self.toc_offset < end:
            raise FormatError(
                f"TOC offset {self.toc_offset} outside the blob "
                f"(blob {blob_size} bytes, footer {self.footer_size} bytes)"
            )
        return self.toc_offset, end


# --- gzip helpers -----------------------------------------------------------------------


def _gzip_extra(member: bytes) -> bytes | None:
    """The Extra field of the gzip header at the start of ``member``, or None.

    None means: not a gzip header, or a header without FEXTRA, or truncated.
    """
    if len(member) < 12 or member[:2] != _GZIP_MAGIC or member[2] != 8:
        return None
    if not member[3] & _FEXTRA or member[3] & 0xE0:
        return None
    (xlen,) = struct.unpack_from("<H", member, 10)
    if 12 + xlen > len(member):
        return None
    return member[12 : 12 + xlen]


def _is_empty_member(member: bytes) -> bool:
    """True if ``member`` is exactly one complete gzip member that inflates to nothing."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(member, 1)
    except zlib.error:
        return False
    return out == b"" and inflater.eof and not inflater.unused_data


def _inflate_member(data: bytes, limit: int, *, need_end: bool, what: str) -> bytes:
    """Inflate the single gzip member at the start of ``data``.

    Returns at most ``limit`` bytes. With ``need_end`` the member must end within
    ``limit`` output bytes (its CRC and length are then checked by zlib); without it,
    inflation stops as soon as ``limit`` bytes are out. Bytes after the member's end are
    ignored (one member only, no multistream).

    Raises FormatError on corrupt data, a member that ends before producing ``limit``
    bytes (when not ``need_end``), a truncated member, or more than ``limit`` bytes.
    """
    inflater = zlib.decompressobj(wbits=31)
    parts: list[bytes] = []
    produced = 0
    pending = data
    try:
        while not inflater.eof and produced < limit:
            # zlib grows its output buffer as needed, up to max_length.
            out = inflater.decompress(pending, limit - produced)
            parts.append(out)
            produced += len(out)
            if not out and inflater.unconsumed_tail == pending:
                break  # no progress: the input is exhausted
            pending = inflater.unconsumed_tail
        if need_end and not inflater.eof and produced >= limit:
            # The member may still end right here; probe for one more byte.
            extra = inflater.decompress(pending, 1)
            if extra:
                raise FormatError(f"{what}: inflates to more than {limit} bytes")
    except zlib.error as exc:
        raise FormatError(f"{what}: corrupt gzip data: {exc}") from None
    except OverflowError:  # a limit past what zlib's max_length takes (2**63)
        raise FormatError(f"{what}: output limit {limit} is out of range") from None
    if need_end and not inflater.eof:
        raise FormatError(f"{what}: gzip member is truncated")
    if not need_end and produced < limit:
        raise FormatError(f"{what}: gzip member ends after {produced} bytes, {limit} needed")
    return b"".join(parts)


# --- footer ----------------------------------------------------------------------------


def _parse_offset_hex(raw: bytes, what: str) -> int:
    if not _HEX16.fullmatch(raw):
        raise FormatError(f"{what} footer: TOC offset {raw!r} is not 16 hex digits")
    value = int(raw, 16)
    if value >= 1 << 63:
        raise FormatError(f"{what} footer: TOC offset {value:#x} exceeds int64")
    return value


def _try_estargz(tail: bytes) -> Footer | None:
    if len(tail) < ESTARGZ_FOOTER_SIZE:
        return None
    member = tail[-ESTARGZ_FOOTER_SIZE:]
    extra = _gzip_extra(member)
    if extra is None or len(extra) != 26 or extra[:2] != b"SG":
        return None
    (sublen,) = struct.unpack_from("<H", extra, 2)
    if sublen != 22 or extra[20:] != b"STARGZ" or not _is_empty_member(member):
        return None
    return Footer(_parse_offset_hex(extra[4:20], "eStargz"), ESTARGZ_FOOTER_SIZE, "estargz")


def _try_legacy(tail: bytes) -> Footer | None:
    if len(tail) < LEGACY_FOOTER_SIZE:
        return None
    member = tail[-LEGACY_FOOTER_SIZE:]
    extra = _gzip_extra(member)
    if extra is None or len(extra) != 22 or extra[16:] != b"STARGZ":
        return None
    if not _is_empty_member(member):
        return None
    offset = _parse_offset_hex(extra[:16], "legacy stargz")
    return Footer(offset, LEGACY_FOOTER_SIZE, "stargz-legacy")


def _reject_unsupported(tail: bytes) -> None:
    if len(tail) >= EXTERNAL_TOC_FOOTER_SIZE:
        extra = _gzip_extra(tail[-EXTERNAL_TOC_FOOTER_SIZE:])
        if extra is not None and extra[:2] == b"SG" and extra[4:] == b"STARGZEXTERNALTOC":
            raise FormatError(
                "eStargz with an external TOC is not supported "
                "(the TOC lives in a separate '-esgztoc' image)"
            )
    if len(tail) >= ZSTD_CHUNKED_FOOTER_SIZE and tail.endswith(_ZSTD_CHUNKED_MAGIC):
        raise FormatError("zstd:chunked layers are not supported (only gzip eStargz is)")


def parse_footer(tail: bytes) -> Footer:
    """Parse the footer from ``tail``, the last ``min(FOOTER_MAX, blob_size)`` bytes.

    Tries, in stargz's order, the 51-byte eStargz footer and the 47-byte legacy stargz
    footer; each is parsed as a real gzip header whose Extra field carries the TOC offset
    as 16 hex digits, and must be a complete, empty gzip member.

    Raises FormatError: ``... not supported`` for the external-TOC (46-byte) and
    zstd:chunked (40-byte) footers, which are recognised but not served; otherwise when
    no footer is found or its TOC offset is malformed. The offset is not checked
    against the blob size here: use ``Footer.toc_range``.
    """
    if len(tail) > FOOTER_MAX:
        tail = tail[-FOOTER_MAX:]
    for attempt in (_try_estargz, _try_legacy):
        footer = attempt(tail)
        if footer is not None:
            return footer
    _reject_unsupported(tail)
    raise FormatError(f"no eStargz or stargz footer in the last {len(tail)} bytes")


# --- TOC -------------------------------------------------------------------------------


def _tar_number(field: bytes, what: str) -> int:
    """Decode a tar numeric field: octal text, or GNU base-256 when the high bit is set."""
    if field and field[0] & 0x80:
        if field[0] & 0x40:
            raise FormatError(f"TOC tar header: negative {what}")
        value = field[0] & 0x3F
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        raise FormatError(f"TOC tar header: {what} field {field!r} is not octal")
    return int(text, 8)


def _tar_checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip(b" ")
    if not stored or not all(0x30 <= c <= 0x37 for c in stored):
        return False
    computed = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
    return int(stored, 8) == computed


def _tar_name(header: bytes) -> bytes:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: name may have a prefix
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """Parse PAX extended-header records (``"%d %s=%s\\n"``); raise FormatError if bad."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise FormatError("TOC tar entry: malformed PAX record length")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n"):
            raise FormatError("TOC tar entry: malformed PAX record")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise FormatError("TOC tar entry: PAX record without '='")
        records[key] = value
        pos += length
    return records


def _read_toc_tar(stream: bytes, max_toc_bytes: int) -> bytes:
    """Read one tar entry (after an optional PAX header) from ``stream``; return its data."""
    pos = 0
    pax: dict[bytes, bytes] = {}
    for _ in range(2):  # at most one PAX header, then the entry itself
        header = stream[pos : pos + _TAR_BLOCK]
        if len(header) < _TAR_BLOCK:
            raise FormatError("TOC member is too short for a tar header")
        if header == bytes(_TAR_BLOCK):
            raise FormatError("TOC member holds an empty tar archive")
        if not _tar_checksum_ok(header):
            raise FormatError("TOC tar header has a bad checksum")
        size = _tar_number(header[124:136], "size")
        typeflag = header[156:157]
        start = pos + _TAR_BLOCK
        if typeflag != b"x" or pax:
            break
        if size > 1 << 16:
            raise FormatError(f"TOC tar entry: PAX header of {size} bytes is too large")
        pax = _pax_records(stream[start : start + size])
        pos = start + -(-size // _TAR_BLOCK) * _TAR_BLOCK
    name = pax.get(b"path", _tar_name(header))
    if b"size" in pax:
        if not pax[b"size"].isdigit():
            raise FormatError("TOC tar entry: PAX size is not a number")
        size = int(pax[b"size"])
    if name != TOC_TAR_NAME.encode():
        raise FormatError(f"TOC tar entry is named {name[:100]!r}, not {TOC_TAR_NAME!r}")
    if typeflag not in (b"0", b"\0"):
        raise FormatError(f"TOC tar entry has type {typeflag!r}, not a regular file")
    if size > max_toc_bytes:
        raise LimitExceeded(f"TOC JSON is {size} bytes, more than the limit of {max_toc_bytes}")
    if start + size > len(stream):
        raise FormatError(f"TOC tar entry is truncated ({len(stream) - start} of {size} bytes)")
    return stream[start : start + size]


def extract_toc(member: bytes, max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES) -> bytes:
    """Return the TOC JSON from ``member``, the blob bytes ``[toc_offset, size-footer)``.

    Inflates exactly one gzip member (bytes after its end are ignored), reads one tar
    header (a preceding PAX header is honoured), requires the entry to be the regular
    file ``stargz.index.json`` and returns its data.

    Raises FormatError for corrupt or truncated gzip, a bad tar header, another entry
    name, or TOC JSON larger than ``max_toc_bytes`` (checked before it is allocated:
    inflation never produces more than ``max_toc_bytes`` plus 1 MiB).
    """
    if max_toc_bytes < 0:
        raise FormatError("max_toc_bytes must not be negative")
    # Inflate the whole member so that zlib checks its CRC and length.
    stream = _inflate_member(
        member, max_toc_bytes + _TOC_MEMBER_SLACK, need_end=True, what="TOC member"
    )
    return _read_toc_tar(stream, max_toc_bytes)


def toc_digest(json_bytes: bytes) -> str:
    """``sha256:<hex>`` of the uncompressed TOC JSON, as in the toc.digest annotation."""
    return sha256_digest(json_bytes)


def verify_toc(json_bytes: bytes, expected: str) -> None:
    """Raise DigestMismatch unless ``toc_digest(json_bytes) == expected``.

    ``expected`` must be ``sha256:<64 lower-case hex>``; anything else is a mismatch too.
    """
    actual = toc_digest(json_bytes)
    if not hmac.compare_digest(actual.encode(), expected.encode("utf-8", "replace")):
        raise DigestMismatch(f"TOC digest is {actual}, expected {expected[:80]}")


# --- chunks ----------------------------------------------------------------------------

_HASHES = {"sha256": 64, "sha512": 128}


def read_chunk(compressed: bytes, chunk: Chunk, *, require_digest: bool = True) -> bytes:
    """Return the uncompressed bytes of ``chunk`` from the blob range starting at it.

    ``compressed`` holds the blob bytes ``[chunk.blob_offset, chunk.blob_end)`` (anything
    after the chunk's gzip member is ignored). One gzip member is inflated only as far
    as needed: ``inner_offset`` bytes are skipped and ``chunk.size`` bytes returned.

    Raises DigestMismatch when the bytes do not match ``chunk.digest``; FormatError for a
    non-gzip chunk, corrupt or short data, or (with ``require_digest``) a chunk without a
    digest, so that unverified data is never returned by accident.
    """
    where = f"chunk at file offset {chunk.file_offset}"
    if chunk.compression != "gzip":
        raise FormatError(f"chunk compression {chunk.compression!r} is not gzip")
    if chunk.size < 0 or chunk.inner_offset < 0:
        raise FormatError(f"{where}: negative size or inner offset")
    if not chunk.digest and require_digest:
        raise FormatError(f"{where}: no digest to verify against")
    if chunk.inner_offset + chunk.size > len(compressed) * MAX_DEFLATE_RATIO:
        raise FormatError(f"{where}: {chunk.inner_offset + chunk.size} bytes cannot come "
                          f"from {len(compressed)} compressed bytes")
    if chunk.size == 0:
        data = b""
    else:
        out = _inflate_member(
            compressed, chunk.inner_offset + chunk.size, need_end=False, what=where
        )
        data = out[chunk.inner_offset :]
    if chunk.digest:
        _check_digest(data, chunk.digest, where)
    return data


def _check_digest(data: bytes, expected: str, what: str) -> None:
    algo, _, hexpart = expected.partition(":")
    if algo not in _HASHES:
        raise FormatError(f"{what}: unsupported digest {expected[:80]!r}")
    actual = hashlib.new(algo, data).hexdigest()
    if not hmac.compare_digest(actual.encode(), hexpart.encode("utf-8", "replace")):
        raise DigestMismatch(f"{what}: digest is {algo}:{actual}, expected {expected}")


# --- fetching --------------------------------------------------------------------------


async def fetch_toc(
    fetcher: BlobFetcher, max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES
) -> tuple[int, Footer, bytes]:
    """Fetch the footer and the TOC of the blob behind ``fetcher``.

    Returns ``(blob_size, footer, toc_json)``. Makes two range requests: the tail, then
    the TOC member. Raises FormatError for a blob that is not eStargz, a TOC member
    larger than ``max_toc_bytes`` + 1 MiB compressed, or a malformed TOC; fetcher errors
    (``RegistryError`` subclasses) propagate unchanged.
    """
    blob_size = await fetcher.size()
    if blob_size <= 0:
        raise FormatError("blob is empty")
    tail_len = min(FOOTER_MAX, blob_size)
    (tail,) = await fetcher.fetch([(blob_size - tail_len, blob_size)])
    footer = parse_footer(tail)
    return blob_size, footer, await read_toc(fetcher, blob_size, tail, footer, max_toc_bytes)


async def read_toc(
    fetcher: BlobFetcher, blob_size: int, tail: bytes, footer: Footer,
    max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES,
) -> bytes:
    """The TOC JSON of a blob whose last ``len(tail)`` bytes were read already (``tail``,
    from which ``footer`` was parsed): the part of the TOC member the tail holds is used,
    and only the part before it is fetched (nothing when the tail holds it all).

    Raises FormatError for a TOC member larger than ``max_toc_bytes`` + 1 MiB compressed
    or a malformed TOC; fetcher errors propagate unchanged.
    """
    start, end = footer.toc_range(blob_size)
    if end - start > max_toc_bytes + _TOC_MEMBER_SLACK:
        raise FormatError(f"compressed TOC member is {end - start} bytes, over the limit")
    held = blob_size - len(tail)  # the tail holds [held, blob_size)
    if start >= held:
        member = tail[start - held : end - held]
    else:
        (head,) = await fetcher.fetch([(start, held)])
        member = head + tail[: end - held]
    return extract_toc(member, max_toc_bytes)


async def open_layer(
    fetcher: BlobFetcher,
    expected_toc_digest: str | None,
    max_toc_bytes: int = DEFAULT_MAX_TOC_BYTES,
    *,
    limits: TocLimits | None = None,
) -> tuple[LayerIndex, bytes]:
    """Fetch, verify and index an eStargz layer; return ``(index, toc_json)``.

    With ``expected_toc_digest`` the TOC JSON must hash to it (DigestMismatch otherwise);
    with None the TOC is not verified (the caller decided that is allowed). Payload
    ranges end at the TOC offset (see ``build_index``'s ``data_end``). ``limits``, when
    given, sets every budget (its ``toc_bytes`` replaces ``max_toc_bytes``). Raises
    FormatError for anything malformed (LimitExceeded for input over a budget); fetcher
    errors propagate unchanged.
    """
    if limits is None:
        limits = TocLimits(toc_bytes=max_toc_bytes)
    blob_size, footer, toc_json = await fetch_toc(fetcher, limits.toc_bytes)
    index = index_toc(toc_json, blob_size, footer.toc_offset, expected_toc_digest,
                      limits=limits)
    return index, toc_json


def index_toc(
    toc_json: bytes, blob_size: int, toc_offset: int, expected_toc_digest: str | None,
    *, limits: TocLimits | None = None,
) -> LayerIndex:
    """Verify ``toc_json`` against ``expected_toc_digest`` (None: not verified) and index it
    within ``limits`` (default: ``TocLimits()``).

    ``toc_offset`` is where the TOC member starts in the blob (payload ranges end there).
    Raises DigestMismatch or FormatError (LimitExceeded for input over a budget).
    """
    limits = TocLimits() if limits is None else limits
    if len(toc_json) > limits.toc_bytes:
        raise LimitExceeded(f"TOC JSON is {len(toc_json)} bytes, over the limit of "
                            f"{limits.toc_bytes}")
    if expected_toc_digest is not None:
        verify_toc(toc_json, expected_toc_digest)
    return build_index(toc_json, blob_size, data_end=toc_offset, max_entries=limits.entries,
                       max_implicit_dirs=limits.implicit_dirs)
