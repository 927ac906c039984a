"""Hostile eStargz TOCs: each is refused with a typed error at mount time, within budget.

The three inputs found by fuzzing the eStargz path are rebuilt here from their
description, and each is refused with a typed reason (``LimitExceeded`` or
``FormatError``) by both of its parsers (``serve``'s check, which runs in the bounded
parser process, and a daemon's ``index_toc``) with under 64 MiB of memory (tracemalloc
peak). CPU figures are recorded in docs/fuzzing.md, never asserted here.
"""

from __future__ import annotations

import json
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from snapshotter.errdefs import FormatError, LimitExceeded
from snapshotter.formats import estargz
from snapshotter.formats.index import Chunk
from snapshotter.formats.limits import TocLimits
from snapshotter.lazy.parsebox import check_estargz_toc

MiB = 1 << 20
BLOB = 10 << 20


def toc(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}).encode()


def deep_names(count: int = 5_000, depth: int = 200) -> bytes:
    """Entries with distinct deep names: each implies ``depth`` directories of its own
    (the 4.3 KB blob / 2 MB TOC that built a million directories)."""
    return toc([{"name": f"d{i}/" + "a/" * depth + "f", "type": "reg", "size": 0}
                for i in range(count)])


def list_bomb(lists: int = 20_000_000) -> bytes:
    """64 MB of ``[],`` in the entry list (61 KB compressed): 21 million lists."""
    return b'{"version":1,"entries":[' + b"[]," * lists + b"[]]}"


def huge_inner_offset() -> bytes:
    return toc([{"name": "f", "type": "reg", "size": 10, "offset": 100,
                 "innerOffset": (1 << 63) - 1}])


def _peak(fn: Callable[[], object]) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        fn()
        error: BaseException | None = None
    except BaseException as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


HOSTILE = [
    pytest.param(deep_names, LimitExceeded, "implies more directories", id="deep-names"),
    pytest.param(list_bomb, LimitExceeded, "JSON arrays", id="list-bomb"),
    pytest.param(huge_inner_offset, FormatError, "cannot|deflate", id="inner-offset"),
]


@pytest.mark.parametrize(("make", "error", "match"), HOSTILE)
def test_daemon_refuses_hostile_toc_within_budget(
        make: Callable[[], bytes], error: type[Exception], match: str) -> None:
    doc = make()
    exc, peak = _peak(lambda: estargz.index_toc(doc, BLOB, BLOB - 100, None))
    with pytest.raises(error, match=match):
        raise exc  # type: ignore[misc]
    assert peak - len(doc) < 64 * MiB, f"peak {peak / MiB:.1f} MiB"


@pytest.mark.parametrize(("make", "error", "match"), HOSTILE)
def test_serve_check_refuses_hostile_toc_within_budget(
        make: Callable[[], bytes], error: type[Exception], match: str) -> None:
    doc = make()
    exc, peak = _peak(lambda: check_estargz_toc(doc, BLOB, BLOB - 100, TocLimits().to_json()))
    with pytest.raises(error, match=match):
        raise exc  # type: ignore[misc]
    assert peak - len(doc) < 64 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_reading_a_chunk_past_what_its_range_can_hold_is_a_format_error() -> None:
    member = zlib.compress(b"x" * 100, wbits=31)
    chunk = Chunk(0, 10, 0, len(member), (1 << 63) - 1, "", "gzip")
    with pytest.raises(FormatError, match="cannot come from"):
        estargz.read_chunk(member, chunk, require_digest=False)


# --- implied directories -----------------------------------------------------------------


def test_implied_directories_are_served_and_counted() -> None:
    doc = toc([{"name": "a/b/c/f", "type": "reg", "size": 0}])  # implies a, a/b, a/b/c
    index = estargz.build_index(doc, BLOB, max_implicit_dirs=3)
    assert index.resolve("a/b/c/f") is not None
    with pytest.raises(LimitExceeded, match="implies more directories"):
        estargz.build_index(doc, BLOB, max_implicit_dirs=2)


def test_implied_directories_count_against_the_entry_limit() -> None:
    doc = toc([{"name": "a/b/c/f", "type": "reg", "size": 0}])  # 1 entry + 3 implied
    assert len(estargz.build_index(doc, BLOB, max_entries=4).nodes) == 5  # and the root
    with pytest.raises(LimitExceeded):
        estargz.build_index(doc, BLOB, max_entries=3)


def test_a_directory_named_after_it_was_implied_keeps_its_inode_and_children() -> None:
    doc = toc([
        {"name": "a/b/f", "type": "reg", "size": 0},
        {"name": "a/", "type": "dir", "mode": 0o700, "uid": 7},
        {"name": "a/b/", "type": "dir", "mode": 0o711},
        {"name": "a/b/g", "type": "hardlink", "linkName": "a/b/f"},
    ])
    index = estargz.build_index(doc, BLOB, max_implicit_dirs=2)
    a = index.resolve("a")
    b = index.resolve("a/b")
    assert a is not None and b is not None
    assert (a.ino, a.mode, a.uid) == (2, 0o700, 7)
    assert (b.ino, b.mode) == (3, 0o711)
    assert set(b.children) == {"f", "g"} and b.children["f"] == b.children["g"]


def test_a_path_through_a_file_is_still_refused() -> None:
    doc = toc([{"name": "a", "type": "reg", "size": 0},
               {"name": "a/b/c", "type": "reg", "size": 0}])
    with pytest.raises(FormatError, match="parent 'a' is not a directory"):
        estargz.build_index(doc, BLOB)


def test_many_braces_inside_names_are_counted_as_objects_only_when_they_are() -> None:
    names = [{"name": "{" * 50 + f"{i}", "type": "reg", "size": 0} for i in range(20)]
    index = estargz.build_index(toc(names), BLOB, max_entries=20)
    assert len(index.root.children) == 20
