"""Directory read-ahead: the decision (``DirectoryAhead``) and the reader's background
fetch of what it names (``ChunkReader`` with ``dir_ahead``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.errdefs import RegistryUnavailable
from snapshotter.formats.index import ROOT_INO, Node
from snapshotter.fs.read.dirahead import DirectoryAhead, compressed_size
from snapshotter.fs.read.reader import ChunkReader
from tests.unit.test_fs_fakes import FakeFetcher, LayerBuilder


def small_dir(count: int = 10, size: int = 100) -> tuple[LayerBuilder, list[Node], Node]:
    """``/d/f00..`` of ``size`` bytes each, then a big ``/d/big`` and ``/other/x``."""
    b = LayerBuilder()
    d = b.dir(ROOT_INO, "d")
    files = [b.file(d.ino, f"f{i:02d}", bytes([i]) * size) for i in range(count)]
    big = b.file(d.ino, "big", b"B" * 5000)
    other = b.dir(ROOT_INO, "other")
    b.file(other.ino, "x", b"x" * size)
    return b, files, big


def test_compressed_size_counts_each_range_once() -> None:
    b = LayerBuilder()
    f = b.file(ROOT_INO, "f", b"x" * 250, chunk_size=100)
    assert compressed_size(f) == 250


def test_the_second_small_miss_in_a_directory_names_its_other_small_files() -> None:
    b, files, _ = small_dir()
    index, _ = b.build()
    ahead = DirectoryAhead(index.nodes, budget_bytes=1 << 20, file_bytes=1000)
    assert ahead.missed(files[0]) == []  # one miss is not a pattern
    got = ahead.missed(files[5])
    assert got == [f for i, f in enumerate(files) if i != 5]  # blob order; big excluded
    assert ahead.missed(files[7]) == []  # once per directory


def test_big_files_neither_count_nor_get_fetched() -> None:
    b, files, big = small_dir()
    index, _ = b.build()
    ahead = DirectoryAhead(index.nodes, budget_bytes=1 << 20, file_bytes=1000)
    assert ahead.missed(big) == []
    assert ahead.missed(big) == []  # big misses never add up to a trigger
    assert ahead.missed(files[0]) == []
    assert big not in ahead.missed(files[1])


def test_misses_in_different_directories_do_not_add_up() -> None:
    b, files, _ = small_dir()
    index, _ = b.build()
    other = index.nodes[index.nodes[ROOT_INO].children["other"]]
    x = index.nodes[other.children["x"]]
    ahead = DirectoryAhead(index.nodes, budget_bytes=1 << 20, file_bytes=1000)
    assert ahead.missed(files[0]) == []
    assert ahead.missed(x) == []


def test_the_budget_takes_the_files_nearest_the_miss() -> None:
    b, files, _ = small_dir(count=10, size=100)
    index, _ = b.build()
    ahead = DirectoryAhead(index.nodes, budget_bytes=450, file_bytes=1000)
    ahead.missed(files[0])
    got = ahead.missed(files[5])
    assert got == [files[3], files[4], files[6], files[7]]  # 4 x 100 bytes <= 450


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DirectoryAhead({}, budget_bytes=0)
    with pytest.raises(ValueError):
        DirectoryAhead({}, budget_bytes=1, file_bytes=0)


def test_a_node_whose_directory_is_unknown_gives_nothing() -> None:
    b, files, _ = small_dir()
    index, _ = b.build()
    nodes = dict(index.nodes)
    del nodes[files[0].parent]
    ahead = DirectoryAhead(nodes, budget_bytes=1 << 20, file_bytes=1000)
    assert ahead.missed(files[0]) == [] and ahead.missed(files[1]) == []


Recorded = list[tuple[str, bool, int, float | None]]


def reader_for(tmp_path: Path, count: int = 10, recorded: Recorded | None = None
               ) -> tuple[ChunkReader, FakeFetcher, list[Node]]:
    b, files, _ = small_dir(count=count)
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    ahead = DirectoryAhead(index.nodes, budget_bytes=1 << 20, file_bytes=1000)

    def record(phase: str, ok: bool, fetched: int, seconds: float | None) -> None:
        if recorded is not None:
            recorded.append((phase, ok, fetched, seconds))

    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path, 1 << 30), dir_ahead=ahead,
                         on_ahead=record)
    return reader, fetcher, files


async def test_the_reader_fetches_the_rest_of_the_directory_in_the_background(
        tmp_path: Path) -> None:
    recorded: Recorded = []
    reader, fetcher, files = reader_for(tmp_path, recorded=recorded)
    assert await reader.read(files[0], 0, 100) == bytes([0]) * 100
    assert await reader.read(files[9], 0, 100) == bytes([9]) * 100
    await reader.wait_idle()
    assert reader.counters.dir_ahead_files == 9  # named: the others, f00 included
    assert reader.counters.dir_ahead_bytes == 800  # fetched: f00 was cached already
    calls = len(fetcher.calls)
    for i, f in enumerate(files):
        assert await reader.read(f, 0, 100) == bytes([i]) * 100
    assert len(fetcher.calls) == calls  # every file came from the cache
    assert reader.counters.cache_misses == 2
    [(phase, ok, fetched, seconds)] = recorded
    assert (phase, ok, fetched) == ("directory", True, 800) and seconds is not None


async def test_parallel_batches_fetch_everything_once(tmp_path: Path) -> None:
    reader, fetcher, files = reader_for(tmp_path, count=20)
    fetched = await reader.fetch_all(files, batch_bytes=300, parallel=3)
    assert fetched == 2000
    ranges = sorted(fetcher.fetched_ranges)
    assert ranges == sorted({(c.blob_offset, c.blob_end) for f in files for c in f.chunks})
    assert max(len(call) for call in fetcher.calls) == 3  # 300-byte batches


async def test_a_failing_read_ahead_leaves_the_files_to_be_fetched_on_demand(
        tmp_path: Path) -> None:
    recorded: Recorded = []
    reader, fetcher, files = reader_for(tmp_path, recorded=recorded)
    await reader.read(files[0], 0, 100)
    fetcher.gate = asyncio.Event()
    second = asyncio.create_task(reader.read(files[9], 0, 100))
    await asyncio.sleep(0.01)
    fetcher.fail = RegistryUnavailable("connection reset")
    fetcher.gate.set()
    with pytest.raises(RegistryUnavailable):
        await second
    await reader.wait_idle()
    assert reader.counters.dir_ahead_bytes == 0
    assert [(p, ok) for p, ok, _, _ in recorded] == [("directory", False)]
    fetcher.fail = None
    fetcher.gate = None
    assert await reader.read(files[4], 0, 100) == bytes([4]) * 100


async def test_close_cancels_a_read_ahead_in_flight(tmp_path: Path) -> None:
    reader, fetcher, files = reader_for(tmp_path)
    await reader.read(files[0], 0, 100)
    fetcher.gate = asyncio.Event()
    second = asyncio.create_task(reader.read(files[9], 0, 100))
    await asyncio.sleep(0.01)
    await reader.aclose()
    fetcher.gate.set()
    await asyncio.gather(second, return_exceptions=True)
    assert not reader._tasks  # nothing left running
