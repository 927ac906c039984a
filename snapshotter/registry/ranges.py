"""Byte-range sets and the HTTP range wire formats; pure functions, no I/O.

A range here is always a half-open ``(start, end)`` pair of ints, ``0 <= start <= end``
(the same convention as :class:`snapshotter.registry.base.BlobFetcher`). HTTP spells ranges
inclusively (``bytes=0-9`` is ``(0, 10)``); only the ``format_*``/``parse_*`` functions
convert.

Planning a fetch: :func:`coalesce` merges ranges whose gap is at most a threshold (a few
wasted bytes are cheaper than another round trip), :func:`split` bounds each request,
:func:`plan` does both, and :func:`extract` maps the fetched pieces back to the ranges
that were asked for.

Parsers raise :class:`RangeFormatError` (a ``RegistryError``: a malformed answer from a
registry) and nothing else; caller mistakes (negative offsets, ``end < start``) raise
``InvalidArgument``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from snapshotter.errdefs import InvalidArgument, RegistryError

Range = tuple[int, int]

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.ASCII)
_RANGE_SPEC_RE = re.compile(r"(\d*)-(\d*)", re.ASCII)
_MAX_DIGITS = 19  # offsets stay below 2**63, like every real blob size


class RangeFormatError(RegistryError):
    """A Range, Content-Range or multipart/byteranges text is malformed or inconsistent."""


def check_ranges(ranges: Iterable[Range]) -> None:
    """Raise InvalidArgument unless every range is ``(start, end)`` ints, ``0 <= start <= end``."""
    for item in ranges:
        if (
            not isinstance(item, tuple)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise InvalidArgument(f"a range must be a (start, end) pair of ints, not {item!r}")
        start, end = item
        if start < 0 or end < start:
            raise InvalidArgument(f"invalid range [{start}, {end})")


def total(ranges: Iterable[Range]) -> int:
    """The number of bytes the ranges span, counting overlaps twice."""
    return sum(end - start for start, end in ranges)


def coalesce(ranges: Iterable[Range], gap: int) -> list[Range]:
    """Sorted, disjoint ranges covering every non-empty input range.

    Two ranges merge when the hole between them is at most ``gap`` bytes (overlapping and
    touching ranges always merge). Empty ranges are dropped. InvalidArgument for bad input.
    """
    if gap < 0:
        raise InvalidArgument(f"coalesce gap must be >= 0, not {gap}")
    items = list(ranges)
    check_ranges(items)
    merged: list[Range] = []
    for start, end in sorted(r for r in items if r[1] > r[0]):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def split(ranges: Iterable[Range], max_size: int) -> list[Range]:
    """Cut every range into consecutive pieces of at most ``max_size`` bytes, in order.

    Empty ranges are dropped. InvalidArgument for bad input or ``max_size < 1``.
    """
    if max_size < 1:
        raise InvalidArgument(f"max piece size must be >= 1, not {max_size}")
    items = list(ranges)
    check_ranges(items)
    pieces: list[Range] = []
    for start, end in items:
        pieces.extend(
            (offset, min(offset + max_size, end)) for offset in range(start, end, max_size)
        )
    return pieces


def plan(ranges: Iterable[Range], *, gap: int, max_size: int) -> list[Range]:
    """The requests to make for ``ranges``: :func:`coalesce` then :func:`split`."""
    return split(coalesce(ranges, gap), max_size)


def extract(requested: Sequence[Range], pieces: Iterable[tuple[Range, bytes]]) -> list[bytes]:
    """The bytes of each requested range, in request order, cut from fetched pieces.

    ``pieces`` are ``((start, end), data)`` pairs in any order; they may overlap (where they
    do, they must agree, which is not checked). Empty requested ranges give ``b""``.
    Raises RangeFormatError when a piece's data length does not match its range or a
    requested byte is not covered; InvalidArgument for malformed requested ranges.
    """
    check_ranges(requested)
    starts, blocks = _blocks(pieces)
    out: list[bytes] = []
    for start, end in requested:
        if start == end:
            out.append(b"")
            continue
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or starts[i] + len(blocks[i]) < end:
            raise RangeFormatError(f"bytes [{start}, {end}) were not in the response")
        offset = start - starts[i]
        out.append(bytes(blocks[i][offset : offset + end - start]))
    return out


def _blocks(pieces: Iterable[tuple[Range, bytes]]) -> tuple[list[int], list[bytearray]]:
    """Merge pieces into disjoint, non-touching blocks: (start offsets, contents)."""
    ordered = sorted(pieces, key=lambda piece: piece[0])
    starts: list[int] = []
    blocks: list[bytearray] = []
    for (start, end), data in ordered:
        if start < 0 or end < start or len(data) != end - start:
            raise RangeFormatError(f"a part for bytes [{start}, {end}) carried {len(data)} bytes")
        if blocks and start <= starts[-1] + len(blocks[-1]):
            block_end = starts[-1] + len(blocks[-1])
            if end > block_end:
                blocks[-1] += data[block_end - start :]
        else:
            starts.append(start)
            blocks.append(bytearray(data))
    return starts, blocks


# --- Range request header --------------------------------------------------------------------


def format_range_header(ranges: Sequence[Range]) -> str:
    """``Range`` header value for non-empty ranges: ``bytes=0-9,20-29`` (inclusive ends).

    InvalidArgument for an empty list or an empty/malformed range.
    """
    check_ranges(ranges)
    if not ranges or any(end == start for start, end in ranges):
        raise InvalidArgument("a Range header needs one or more non-empty ranges")
    return "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in ranges)


def parse_range_header(value: str, size: int) -> list[Range]:
    """Parse a ``Range`` header against a representation of ``size`` bytes (for servers).

    Supports ``a-b``, ``a-`` and suffix ``-n`` specs; ends past the size are clamped and
    unsatisfiable specs dropped, so an empty result means "answer 416". Raises
    RangeFormatError for a syntactically bad header or a unit other than ``bytes``.
    """
    unit, sep, specs = value.strip().partition("=")
    if sep != "=" or unit.strip().lower() != "bytes":
        raise RangeFormatError("a Range header must start with 'bytes='")
    result: list[Range] = []
    for raw in specs.split(","):
        spec = raw.strip()
        match = _RANGE_SPEC_RE.fullmatch(spec)
        if match is None or spec == "-" or any(len(g) > _MAX_DIGITS for g in match.groups()):
            raise RangeFormatError(f"bad range spec {spec[:40]!r}")
        first, last = match.groups()
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = size if last == "" else min(int(last) + 1, size)
            if last != "" and int(last) < start:
                raise RangeFormatError(f"bad range spec {spec!r}: last before first")
        if start < end:
            result.append((start, end))
    return result


# --- Content-Range ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentRange:
    """A parsed ``Content-Range``: ``range`` is None for ``bytes */total`` (a 416 answer);
    ``total`` is None for an unknown length (``/*``)."""

    range: Range | None
    total: int | None


def parse_content_range(value: str) -> ContentRange:
    """Parse ``bytes first-last/total``, ``bytes first-last/*`` or ``bytes */total``.

    Raises RangeFormatError when malformed, when last < first, or when the range does not
    fit in the total.
    """
    match = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if match is None or any(g is not None and len(g) > _MAX_DIGITS for g in match.groups()):
        raise RangeFormatError(f"bad Content-Range {value[:80]!r}")
    first, last, size = match.groups()
    total_ = None if size == "*" else int(size)
    if first is None:
        if total_ is None:
            raise RangeFormatError("Content-Range 'bytes */*' carries nothing")
        return ContentRange(range=None, total=total_)
    start, end = int(first), int(last) + 1
    if end <= start or (total_ is not None and end > total_):
        raise RangeFormatError(f"inconsistent Content-Range {value[:80]!r}")
    return ContentRange(range=(start, end), total=total_)


def format_content_range(byte_range: Range, size: int | None) -> str:
    """``Content-Range`` value for a non-empty half-open range of a ``size``-byte entity."""
    start, end = byte_range
    return f"bytes {start}-{end - 1}/{'*' if size is None else size}"


# --- multipart/byteranges --------------------------------------------------------------------


def multipart_boundary(content_type: str) -> str:
    """The boundary of a ``multipart/byteranges`` Content-Type.

    Raises RangeFormatError for any other media type or a missing/invalid boundary.
    """
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "multipart/byteranges":
        raise RangeFormatError(f"not a multipart/byteranges body: {media_type.strip()[:60]!r}")
    for name, value in _parameters(params):
        if name == "boundary" and 0 < len(value) <= 70:
            return value
    raise RangeFormatError("multipart/byteranges without a valid boundary")


def _parameters(text: str) -> list[tuple[str, str]]:
    """``; name=value; name="quoted \\" value"`` -> [(lower-case name, value)]."""
    result: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        semi = text.find("=", pos)
        if semi < 0:
            break
        name = text[pos:semi].strip(" \t;").lower()
        pos = semi + 1
        if text[pos : pos + 1] == '"':
            value, pos = _quoted(text, pos)
        else:
            end = text.find(";", pos)
            end = len(text) if end < 0 else end
            value, pos = text[pos:end].strip(), end
        result.append((name, value))
        next_semi = text.find(";", pos)
        pos = len(text) if next_semi < 0 else next_semi + 1
    return result


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """Read the quoted-string starting at ``text[pos] == '"'``; return (value, next pos)."""
    chars: list[str] = []
    i = pos + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(chars), i + 1
        chars.append(ch)
        i += 1
    raise RangeFormatError("unterminated quoted string in a header parameter")


def parse_multipart_byteranges(body: bytes, boundary: str) -> list[tuple[Range, bytes]]:
    """Split a ``multipart/byteranges`` body (RFC 9110 §14.6, RFC 2046 §5.1) into parts.

    Each part must carry a ``Content-Range`` with a concrete range; its data is taken by
    that length (so the boundary may appear inside data). Returns ``((start, end), data)``
    in body order. Raises RangeFormatError for any framing error or a body with no parts.
    """
    delimiter = b"--" + boundary.encode("latin-1", errors="replace")
    pos = body.find(delimiter)
    if pos < 0:
        raise RangeFormatError("multipart body without its boundary")
    parts: list[tuple[Range, bytes]] = []
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            break
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise RangeFormatError("malformed multipart delimiter line")
        part_range, data_start = _part_headers(body, line_end + 2)
        data_end = data_start + part_range[1] - part_range[0]
        if data_end > len(body):
            raise RangeFormatError("multipart part shorter than its Content-Range")
        parts.append((part_range, body[data_start:data_end]))
        if not body.startswith(b"\r\n" + delimiter, data_end):
            raise RangeFormatError("multipart part not followed by its boundary")
        pos = data_end + 2
    if not parts:
        raise RangeFormatError("multipart body without parts")
    return parts


def _part_headers(body: bytes, pos: int) -> tuple[Range, int]:
    """Parse the header block of one part starting at ``pos``: (its range, data offset)."""
    if body.startswith(b"\r\n", pos):
        raise RangeFormatError("multipart part without a Content-Range")
    end = body.find(b"\r\n\r\n", pos)
    if end < 0:
        raise RangeFormatError("unterminated multipart part headers")
    part_range: Range | None = None
    for line in body[pos:end].split(b"\r\n"):
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise RangeFormatError("malformed multipart part header")
        if name.strip().lower() == "content-range":
            part_range = parse_content_range(value).range
    if part_range is None:
        raise RangeFormatError("multipart part without a concrete Content-Range")
    return part_range, end + 4


def encode_multipart_byteranges(
    parts: Sequence[tuple[Range, bytes]],
    size: int | None,
    boundary: str,
    part_type: str = "application/octet-stream",
) -> bytes:
    """Build a ``multipart/byteranges`` body (what a server sends; used by fakes and tests).

    InvalidArgument when a part's data length differs from its range or a part is empty.
    """
    out = bytearray()
    for (start, end), data in parts:
        if end <= start or len(data) != end - start:
            raise InvalidArgument(f"part [{start}, {end}) has {len(data)} bytes")
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n".encode("latin-1")
        out += f"Content-Range: {format_content_range((start, end), size)}\r\n\r\n".encode(
            "latin-1"
        )
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode("latin-1")
    return bytes(out)
