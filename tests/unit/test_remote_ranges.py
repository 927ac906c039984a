"""Byte-range sets and HTTP range formats (snapshotter.registry.ranges), property-tested."""

from __future__ import annotations

import contextlib
import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.errdefs import InvalidArgument
from snapshotter.registry import ranges as rng
from snapshotter.registry.ranges import RangeFormatError

SIZE = 4096
# Fixed, non-periodic content: an offset error of any size shows up as different bytes.
DATA = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(SIZE // 32))


@st.composite
def range_lists(draw: st.DrawFn, size: int = SIZE) -> list[rng.Range]:
    pairs = draw(st.lists(st.tuples(st.integers(0, size), st.integers(0, size)), max_size=20))
    return [(min(a, b), max(a, b)) for a, b in pairs]


def covered(ranges: list[rng.Range]) -> set[int]:
    return {i for s, e in ranges for i in range(s, e)}


@given(range_lists(), st.integers(0, 300))
def test_coalesce_covers_sorts_and_respects_gap(ranges: list[rng.Range], gap: int) -> None:
    merged = rng.coalesce(ranges, gap)
    assert covered(ranges) <= covered(merged)
    assert all(s < e for s, e in merged)
    for (_, end), (start, _) in itertools.pairwise(merged):
        assert start - end > gap
    wanted = covered(ranges)
    for start, end in merged:
        assert start in wanted and end - 1 in wanted
        hole = 0
        for offset in range(start, end):
            hole = 0 if offset in wanted else hole + 1
            assert hole <= gap
    if gap == 0:
        assert covered(merged) == wanted


@given(range_lists(), st.integers(1, 500))
def test_split_bounds_pieces_and_preserves_bytes(ranges: list[rng.Range], limit: int) -> None:
    pieces = rng.split(ranges, limit)
    assert all(0 < e - s <= limit for s, e in pieces)
    assert rng.total(pieces) == rng.total(ranges)
    assert covered(pieces) == covered(ranges)


@given(range_lists(), st.integers(0, 100), st.integers(1, 700))
def test_plan_then_extract_returns_requested_bytes(
    ranges: list[rng.Range], gap: int, limit: int
) -> None:
    data = DATA
    pieces = rng.plan(ranges, gap=gap, max_size=limit)
    fetched = [((s, e), data[s:e]) for s, e in reversed(pieces)]
    assert rng.extract(ranges, fetched) == [data[s:e] for s, e in ranges]


@given(range_lists())
def test_extract_accepts_overlapping_pieces(ranges: list[rng.Range]) -> None:
    data = DATA
    pieces = [((s, e), data[s:e]) for s, e in ranges] * 2
    assert rng.extract(ranges, pieces) == [data[s:e] for s, e in ranges]


def test_extract_reports_missing_and_inconsistent_pieces() -> None:
    with pytest.raises(RangeFormatError):
        rng.extract([(0, 10)], [((0, 5), b"12345")])
    with pytest.raises(RangeFormatError):
        rng.extract([(0, 10)], [((0, 5), b"12345"), ((6, 10), b"7890")])
    with pytest.raises(RangeFormatError):
        rng.extract([(0, 2)], [((0, 5), b"1234")])
    assert rng.extract([(3, 3)], []) == [b""]


@pytest.mark.parametrize("bad", [[(-1, 2)], [(5, 4)], [(0.5, 2)], [(True, 2)], [(1, 2, 3)]])
def test_invalid_ranges(bad: list[rng.Range]) -> None:
    with pytest.raises(InvalidArgument):
        rng.check_ranges(bad)
    with pytest.raises(InvalidArgument):
        rng.coalesce(bad, 0)


def test_invalid_parameters() -> None:
    with pytest.raises(InvalidArgument):
        rng.coalesce([], -1)
    with pytest.raises(InvalidArgument):
        rng.split([], 0)
    with pytest.raises(InvalidArgument):
        rng.format_range_header([])
    with pytest.raises(InvalidArgument):
        rng.format_range_header([(3, 3)])


@given(range_lists().filter(lambda rs: any(e > s for s, e in rs)))
def test_range_header_round_trip(ranges: list[rng.Range]) -> None:
    nonempty = [(s, e) for s, e in ranges if e > s]
    header = rng.format_range_header(nonempty)
    assert rng.parse_range_header(header, SIZE) == nonempty


def test_parse_range_header_forms() -> None:
    assert rng.parse_range_header("bytes=0-9, 20-", 100) == [(0, 10), (20, 100)]
    assert rng.parse_range_header("bytes=-10", 100) == [(90, 100)]
    assert rng.parse_range_header("bytes=-1000", 100) == [(0, 100)]
    assert rng.parse_range_header("bytes=90-200", 100) == [(90, 100)]
    assert rng.parse_range_header("bytes=100-200", 100) == []
    for bad in ("items=0-1", "bytes=a-b", "bytes=5-1", "bytes=-", "0-1", "bytes=1-2;"):
        with pytest.raises(RangeFormatError):
            rng.parse_range_header(bad, 100)


@given(st.integers(0, 2**40), st.integers(1, 2**20), st.one_of(st.none(), st.integers(0, 2**20)))
def test_content_range_round_trip(start: int, length: int, slack: int | None) -> None:
    size = None if slack is None else start + length + slack
    value = rng.format_content_range((start, start + length), size)
    assert rng.parse_content_range(value) == rng.ContentRange((start, start + length), size)


def test_parse_content_range_forms() -> None:
    assert rng.parse_content_range("bytes */123") == rng.ContentRange(None, 123)
    assert rng.parse_content_range(" bytes 0-0/1 ") == rng.ContentRange((0, 1), 1)
    for bad in ("bytes 5-4/10", "bytes 0-10/10", "bytes */*", "bits 0-1/2", "bytes 0-1", ""):
        with pytest.raises(RangeFormatError):
            rng.parse_content_range(bad)


@given(st.text(max_size=60))
def test_parse_content_range_total(value: str) -> None:
    with contextlib.suppress(RangeFormatError):
        rng.parse_content_range(value)


BOUNDARIES = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\;'),
    min_size=1,
    max_size=40,
)


@given(range_lists(), BOUNDARIES)
def test_multipart_round_trip(ranges: list[rng.Range], boundary: str) -> None:
    data = DATA
    parts = [((s, e), data[s:e]) for s, e in ranges if e > s]
    if not parts:
        return
    body = b"preamble\r\n" + rng.encode_multipart_byteranges(parts, SIZE, boundary)
    content_type = f'multipart/byteranges; boundary="{boundary}"'
    assert rng.parse_multipart_byteranges(body, rng.multipart_boundary(content_type)) == parts


def test_multipart_boundary_inside_data_is_harmless() -> None:
    data = b"--b\r\n--b--\r\n" * 3
    body = rng.encode_multipart_byteranges([((0, len(data)), data)], None, "b")
    assert rng.parse_multipart_byteranges(body, "b") == [((0, len(data)), data)]


@given(st.binary(max_size=300), st.sampled_from(["b", "xyz", "3d6b6a416f9b5"]))
def test_multipart_parser_total(body: bytes, boundary: str) -> None:
    try:
        parts = rng.parse_multipart_byteranges(body, boundary)
    except RangeFormatError:
        return
    assert all(len(data) == e - s for (s, e), data in parts)


@given(st.binary(max_size=200))
def test_multipart_parser_total_on_mutated_bodies(noise: bytes) -> None:
    good = rng.encode_multipart_byteranges([((0, 3), b"abc"), ((10, 12), b"xy")], 20, "B")
    for cut in (len(good) // 3, len(good) // 2, len(good) - 3):
        for body in (good[:cut], good[:cut] + noise, noise + good[cut:]):
            with contextlib.suppress(RangeFormatError):
                rng.parse_multipart_byteranges(body, "B")


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/byteranges; boundary=abc", "abc"),
        ('Multipart/ByteRanges;boundary="a b;c"', "a b;c"),
        ('multipart/byteranges; charset=x; boundary="q\\"x"', 'q"x'),
    ],
)
def test_multipart_boundary(content_type: str, boundary: str) -> None:
    assert rng.multipart_boundary(content_type) == boundary


@pytest.mark.parametrize(
    "content_type",
    [
        "application/octet-stream",
        "multipart/byteranges",
        "multipart/byteranges; boundary=",
        'multipart/byteranges; boundary="unterminated',
        "multipart/byteranges; boundary=" + "x" * 71,
    ],
)
def test_multipart_boundary_rejects(content_type: str) -> None:
    with pytest.raises(RangeFormatError):
        rng.multipart_boundary(content_type)


def test_parse_multipart_rejects_framing_errors() -> None:
    good = rng.encode_multipart_byteranges([((0, 3), b"abc")], 10, "B")
    with pytest.raises(RangeFormatError):
        rng.parse_multipart_byteranges(good, "other")
    with pytest.raises(RangeFormatError):
        rng.parse_multipart_byteranges(b"--B--\r\n", "B")
    no_range = b"--B\r\nContent-Type: x\r\n\r\nabc\r\n--B--\r\n"
    with pytest.raises(RangeFormatError):
        rng.parse_multipart_byteranges(no_range, "B")
    with pytest.raises(InvalidArgument):
        rng.encode_multipart_byteranges([((0, 3), b"ab")], 10, "B")
