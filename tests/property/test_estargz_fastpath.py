"""The eStargz TOC fast paths agree with the checked code they shortcut.

``estargz_toc`` decodes the usual entry with ``_decode_fast`` and normalises the usual
name with ``_clean_fast``; both hand anything unusual to the checked code
(``_decode_checked``, ``_clean_components``), which alone produces errors. The
properties: whenever a fast path answers, the checked code gives the same answer (and
no error), and the combined functions behave exactly like the checked code, on
generated hostile input. Likewise ``_TreeBuilder.add`` builds a regular file's single
chunk itself when ``make_chunks`` would accept it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from snapshotter.errdefs import FormatError
from snapshotter.formats import estargz as E
from snapshotter.formats import estargz_toc as T
from snapshotter.formats import estargz_tree as R
from snapshotter.formats.index import ROOT_INO

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATA_END = 1 << 20

_PARTS = st.sampled_from([
    "a", "b", "usr", "é", "ü" * 64, "\ud800", "\udc80", "x" * 255, "y" * 256, ".", "..",
    "", ".wh.x", ".wh..wh..opq", ".hidden", "a.b", "a\0b", " ", "\\",
])
raw_names = (
    st.lists(_PARTS, max_size=5).map("/".join)
    | st.tuples(st.sampled_from(["", "/", "./", ".//", "../", "//"]),
                st.lists(_PARTS, max_size=4).map("/".join),
                st.sampled_from(["", "/", "/.", "/.."])).map("".join)
    | st.text(max_size=20)
)
_SHA256 = "sha256:" + "0123456789abcdef" * 4
_DIGESTS = st.sampled_from([
    _SHA256, "sha512:" + "ab" * 64, _SHA256.upper(), _SHA256[:-1], _SHA256 + "0",
    "sha256:" + "g" * 64, "md5:" + "a" * 32, "", "sha256:" + "\u0660" * 64,
])
_TIMES = st.sampled_from([
    "2024-11-21T20:01:54Z", "2024-11-21T20:01:54.123456789+05:30", "2024-11-21t20:01:54z",
    "1970-01-01T00:00:00Z", "2024-02-30T00:00:00Z", "2024-11-21T20:01:54+24:00",
    "2024-11-21T20:01:54-00:60", "2024-11-21 20:01:54Z", "2024-11-21T20:01:54.1234567891Z",
    "\u0662\u0660\u0662\u0664-11-21T20:01:54Z", "", "\ud800",
])
_HOSTILE = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.just(1.0), st.just(-0.0),
    st.integers(-(2**65), 2**65), st.sampled_from([-1, 2**32 - 1, 2**32, 2**63 - 1, 2**63]),
    st.text(max_size=4), st.just([]), st.just({}), st.just([1]),
)
_XATTRS = st.dictionaries(
    st.sampled_from(["user.a", "security.capability", "", "a\0b", "x" * 256, "\ud800"]),
    st.sampled_from(["", "aGVsbG8=", "!!", None, 1, "=" * 4]),
    max_size=3,
)


def _ints(maximum: int) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    """(valid, hostile) values of an integer field whose range is [0, maximum]."""
    valid = st.integers(0, 4096) | st.sampled_from([0, maximum]) | st.integers(0, maximum)
    hostile = st.sampled_from([-1, maximum + 1, True, False, 1.0, "1", 2**64]) | _HOSTILE
    return valid, hostile


_TEXT_HOSTILE = st.sampled_from(["a\0b", "\ud800", "\udc80x", "t" * 4096, "", "./", "/"])
# Field -> (valid values, hostile values). An entry has valid values but for at most
# two hostile ones, so that each check of the fast path gets to fail on its own.
_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "name": (st.sampled_from(["a", "usr/bin/x", "./etc/", "/.wh.x", "é/ü"]),
             raw_names | _HOSTILE),
    "type": (st.sampled_from(sorted(T.ENTRY_TYPES)),
             st.sampled_from(["", "Reg", "dir\ud800", "chunk "]) | _HOSTILE),
    "size": _ints(2**63 - 1),
    "modtime": (st.sampled_from(["2024-11-21T20:01:54Z", "2024-11-21T20:01:54.5+05:30"]),
                _TIMES | _HOSTILE),
    "mode": _ints(2**63 - 1),
    "uid": _ints(2**32 - 1),
    "gid": _ints(2**32 - 1),
    "linkName": (st.sampled_from(["target", "./a/b", "/abs/x", "é"]),
                 raw_names | _TEXT_HOSTILE | _HOSTILE),
    "offset": (st.integers(1, DATA_END - 1) | st.just(0),
               st.sampled_from([DATA_END - 1, DATA_END, DATA_END + 1, 2**63]) | _HOSTILE),
    "innerOffset": _ints(2**63 - 1),
    "devMajor": _ints(2**32 - 1),
    "devMinor": _ints(2**32 - 1),
    "xattrs": (st.dictionaries(st.sampled_from(["user.a", "security.capability"]),
                               st.sampled_from(["", "aGVsbG8=", None]), max_size=2),
               _XATTRS | _HOSTILE),
    "digest": (st.sampled_from([_SHA256, "sha512:" + "ab" * 64, ""]), _DIGESTS | _HOSTILE),
    "chunkOffset": _ints(2**63 - 1),
    "chunkSize": _ints(2**63 - 1),
    "chunkDigest": (st.sampled_from([_SHA256, "sha512:" + "ab" * 64, ""]),
                    _DIGESTS | _HOSTILE),
    "unknownKey": (_HOSTILE, _HOSTILE),
}


@st.composite
def toc_objects(draw: st.DrawFn, hostile: str | None = None) -> dict[str, Any]:
    """A TOC entry object with a hostile value for field ``hostile`` (if any).

    ``name`` and ``type`` are valid unless hostile; other fields are absent, null or
    valid, so that each check of the fast path gets to fail on its own.
    """
    optional = sorted(set(_FIELDS) - {"name", "type", hostile})
    present = draw(st.sets(st.sampled_from(optional)))  # from none to all of them
    obj: dict[str, Any] = {}
    for key, (valid, bad) in _FIELDS.items():
        if key == hostile:
            obj[key] = draw(bad)
        elif key == "type" and hostile == "linkName":
            obj[key] = draw(st.sampled_from(["symlink", "hardlink", "reg"]))
        elif key in ("name", "type"):
            obj[key] = draw(valid)
        elif key in present:
            obj[key] = draw(valid | st.none())
    return obj


def _outcome(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return "ok", call()
    except Exception as exc:  # any exception: both sides must raise the same
        return type(exc).__name__, str(exc)


@FUZZ
@given(raw_names)
def test_clean_fast_agrees_with_components(raw: str) -> None:
    checked = _outcome(lambda: T._clean_components(raw, "name"))
    fast = T._clean_fast(raw)
    if fast is not None:
        assert checked == ("ok", fast)
    assert _outcome(lambda: T.clean_name(raw)) == checked


@pytest.mark.parametrize("hostile", [None, *_FIELDS])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), data_end=st.sampled_from([DATA_END, DATA_END, DATA_END, 0, 1]))
def test_fast_decoder_agrees_with_checked(
    hostile: str | None, data: st.DataObject, data_end: int
) -> None:
    obj = data.draw(toc_objects(hostile))
    checked = _outcome(lambda: T._decode_checked(3, obj, data_end))
    fast = T._decode_fast(3, obj, data_end)
    if fast is not None:
        assert checked == ("ok", fast)
    assert _outcome(lambda: T._decode_entry(3, obj, data_end)) == checked


@FUZZ
@given(obj=st.dictionaries(st.sampled_from([*_FIELDS, "x"]), _HOSTILE | raw_names | _DIGESTS,
                           max_size=8))
def test_fast_decoder_agrees_on_junk(obj: dict[str, Any]) -> None:
    checked = _outcome(lambda: T._decode_checked(3, obj, DATA_END))
    fast = T._decode_fast(3, obj, DATA_END)
    if fast is not None:
        assert checked == ("ok", fast)
    assert _outcome(lambda: T._decode_entry(3, obj, DATA_END)) == checked


def test_fast_decoder_takes_usual_entries() -> None:
    usual: list[dict[str, Any]] = [
        {"name": "./usr/", "type": "dir", "modtime": "2024-11-21T20:01:54Z", "mode": 493},
        {"name": "usr/bin/env", "type": "reg", "size": 10, "mode": 493, "offset": 99,
         "modtime": "2024-11-21T20:01:54Z", "digest": _SHA256, "chunkDigest": _SHA256},
        {"name": "/usr/bin/sh", "type": "symlink", "linkName": "dash", "mode": 511},
        {"name": "usr/bin/[", "type": "hardlink", "linkName": "./usr/bin/test"},
        {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "uid": 0},
        {"name": "usr/bin/ping", "type": "reg", "uid": 1000, "gid": 1000,
         "xattrs": {"security.capability": "AQAAAgAgAAAAAAAAAAAAAAAAAAA="}},
        {"name": "big", "type": "chunk", "offset": 5, "innerOffset": 7, "chunkOffset": 100,
         "chunkSize": 100, "chunkDigest": _SHA256},
        {"name": "usr/share/doc/é", "type": "reg", "digest": None},
    ]
    for obj in usual:
        fast = T._decode_fast(0, obj, DATA_END)
        assert fast is not None, obj
        assert fast == T._decode_checked(0, obj, DATA_END)


@FUZZ
@given(
    size=st.sampled_from([0, 1, 100]),
    offset=st.sampled_from([0, 10, 500]),
    inner_offset=st.sampled_from([0, 7]),
    chunk_offset=st.sampled_from([0, 1, 100]),
    chunk_size=st.sampled_from([0, 1, 99, 100, 101]),
    next_offset=st.sampled_from([None, 10, 11, 600]),
    digests=st.sampled_from([{}, {"digest": _SHA256}, {"chunkDigest": _SHA256},
                             {"digest": _SHA256, "chunkDigest": "sha512:" + "ab" * 64}]),
)
def test_inline_single_chunk_agrees_with_make_chunks(
    size: int, offset: int, inner_offset: int, chunk_offset: int, chunk_size: int,
    next_offset: int | None, digests: dict[str, str],
) -> None:
    entry: dict[str, Any] = {"name": "f", "type": "reg", "size": size, "offset": offset,
                             "innerOffset": inner_offset, "chunkOffset": chunk_offset,
                             "chunkSize": chunk_size, **digests}
    entries = [entry]
    if next_offset is not None:  # a later payload ends this one's compressed range
        entries.append({"name": "g", "type": "reg", "size": 1, "offset": next_offset})
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    try:
        parsed = E.parse_toc(doc, DATA_END)
    except FormatError:
        assume(False)
    expected = _outcome(lambda: R.make_chunks(parsed[0], []))
    got = _outcome(lambda: E.build_index(doc, DATA_END).nodes[ROOT_INO + 1].chunks)
    assert got == expected
