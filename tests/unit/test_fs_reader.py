"""ChunkReader: ranges across chunks, coalescing, single flight, verification, read-ahead."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import pytest

from snapshotter.cache.chunkcache import ChunkCache, chunk_key
from snapshotter.errdefs import DigestMismatch, FormatError, RegistryUnavailable, Unavailable
from snapshotter.formats.index import ROOT_INO, Chunk, Node, NodeKind
from snapshotter.fs.read.reader import WHOLE_FILE_MIN_BYTES, ChunkReader
from tests.unit.test_fs_fakes import FakeFetcher, LayerBuilder, sha256

DATA = bytes(range(256)) * 4 + b"tail"  # 1028 bytes


def make(tmp_path: Path, data: bytes = DATA, chunk_size: int = 100, readahead: int = 0
         ) -> tuple[ChunkReader, FakeFetcher, Node, ChunkCache]:
    b = LayerBuilder()
    node = b.file(ROOT_INO, "f", data, chunk_size=chunk_size)
    _, blob = b.build()
    fetcher = FakeFetcher(blob)
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    return ChunkReader({"": fetcher}, cache, readahead_chunks=readahead), fetcher, node, cache


async def test_any_offset_and_length(tmp_path: Path) -> None:
    reader, _, node, _ = make(tmp_path)
    for offset in (0, 1, 99, 100, 101, 250, 999, 1000, 1027):
        for length in (1, 2, 99, 100, 101, 333, 5000):
            assert await reader.read(node, offset, length) == DATA[offset : offset + length]
    assert await reader.read(node, 1028, 10) == b""
    assert await reader.read(node, 5000, 10) == b""
    assert await reader.read(node, 10, 0) == b""


async def test_missing_chunks_of_one_read_are_fetched_in_one_call(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path)
    assert await reader.read(node, 150, 250) == DATA[150:400]  # chunks 1, 2, 3
    assert fetcher.calls == [[(100, 200), (200, 300), (300, 400)]]
    assert reader.counters.cache_misses == 3
    assert reader.counters.fetched_bytes == 300
    assert reader.counters.served_bytes == 250


async def test_cached_chunks_are_never_fetched_again(tmp_path: Path) -> None:
    reader, fetcher, node, cache = make(tmp_path)
    assert await reader.read(node, 0, 2000) == DATA
    calls = len(fetcher.calls)
    assert await reader.read(node, 0, 2000) == DATA
    assert await reader.read(node, 555, 10) == DATA[555:565]
    await reader.wait_idle()  # chunks are stored right after they are served
    fresh = ChunkReader({"": fetcher}, cache)  # another reader on the same cache
    assert await fresh.read(node, 0, 2000) == DATA
    assert len(fetcher.calls) == calls
    assert fresh.counters.cache_hits == 11 and fresh.counters.fetched_bytes == 0


async def test_single_flight(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path)
    fetcher.gate = asyncio.Event()
    reads = [asyncio.create_task(reader.read(node, 10 + i, 20)) for i in range(8)]
    await fetcher.started.wait()
    await asyncio.sleep(0)  # let every read register before the fetch completes
    fetcher.gate.set()
    results = await asyncio.gather(*reads)
    assert results == [DATA[10 + i : 30 + i] for i in range(8)]
    assert fetcher.calls == [[(0, 100)]]


async def test_corrupt_chunk_raises_and_is_not_cached(tmp_path: Path) -> None:
    reader, fetcher, node, cache = make(tmp_path)
    good = fetcher.blob
    fetcher.blob = good[:205] + b"X" + good[206:]  # corrupt chunk 2
    with pytest.raises(DigestMismatch):
        await reader.read(node, 150, 100)  # chunks 1 and 2
    await reader.wait_idle()
    assert not reader.is_cached(node.chunks[2])
    assert reader.is_cached(node.chunks[1])  # the good chunk of the same fetch is kept
    fetcher.blob = good
    assert await reader.read(node, 150, 100) == DATA[150:250]
    assert fetcher.calls[-1] == [(200, 300)]
    await reader.wait_idle()
    assert cache.stats().bytes_stored == 200


async def test_fetch_errors_propagate_and_do_not_stick(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path)
    fetcher.fail = RegistryUnavailable("registry down")
    with pytest.raises(RegistryUnavailable):
        await reader.read(node, 0, 10)
    fetcher.fail = None
    assert await reader.read(node, 0, 10) == DATA[:10]


async def test_unknown_compression_is_a_format_error(tmp_path: Path) -> None:
    reader, _, _, _ = make(tmp_path)
    odd = Node(ino=99, kind=NodeKind.REG, mode=0o644, size=4,
               chunks=[Chunk(0, 4, 0, 4, 0, sha256(DATA[:4]), "brotli")])
    with pytest.raises(FormatError, match="brotli"):
        await reader.read(odd, 0, 4)


async def test_gzip_chunks_dispatch_to_the_estargz_decoder(tmp_path: Path) -> None:
    payload = b"gzip payload " * 100
    member = gzip.compress(b"skipme" + payload)
    fetcher = FakeFetcher(b"junk" + member)
    node = Node(ino=5, kind=NodeKind.REG, mode=0o644, size=len(payload),
                chunks=[Chunk(0, len(payload), 4, 4 + len(member), 6, sha256(payload), "gzip")])
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path, 1 << 20))
    assert await reader.read(node, 0, 10_000) == payload


async def test_sequential_reads_trigger_read_ahead(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path, readahead=3)
    await reader.read(node, 0, 50)
    await reader.read(node, 50, 50)  # sequential: chunks 1..3 are fetched in the background
    await reader.wait_idle()
    assert [node.chunks[i] for i in range(1, 4) if reader.is_cached(node.chunks[i])] == [
        node.chunks[1], node.chunks[2], node.chunks[3]
    ]
    assert not reader.is_cached(node.chunks[4])
    assert reader.counters.readahead_chunks == 3
    calls = len(fetcher.calls)
    assert await reader.read(node, 100, 300) == DATA[100:400]  # all served from the cache
    await reader.wait_idle()
    assert reader.counters.readahead_chunks == 6  # the window moved on: chunks 4..6
    assert len(fetcher.calls) == calls + 3


async def test_random_reads_do_not_read_ahead(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path, readahead=3)
    for offset in (900, 100, 500, 0):
        await reader.read(node, offset, 10)
    await reader.wait_idle()
    assert reader.counters.readahead_chunks == 0 and len(fetcher.calls) == 4


async def test_fetch_all_fills_the_cache_once_and_paces(tmp_path: Path) -> None:
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    data = b"".join(i.to_bytes(4, "big") * (1 << 18) for i in range(9)) + b"end"
    b = LayerBuilder()
    node = b.file(ROOT_INO, "big", data, chunk_size=1 << 20)
    _, blob = b.build()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path, 1 << 30), sleep=fake_sleep)
    fetched = await reader.fetch_all([node, node], rate_limit_bytes_per_s=1 << 20)
    assert fetched == len(data)
    assert len(fetcher.calls) == 3  # 4 MiB batches: 4 + 4 + 2 chunks
    assert len(sleeps) == 3 and sleeps[-1] > 0  # paced to 1 MiB/s: asks to wait
    assert all(reader.is_cached(c) for c in node.chunks)
    assert await reader.fetch_all([node]) == 0
    assert len(fetcher.calls) == 3


async def test_aclose_fails_pending_reads(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path)
    fetcher.gate = asyncio.Event()
    pending = asyncio.create_task(reader.read(node, 0, 10))
    await fetcher.started.wait()
    await reader.aclose()
    with pytest.raises(Unavailable):
        await pending
    with pytest.raises(Unavailable):
        await reader.read(node, 0, 10)


async def test_a_malformed_digest_fails_the_read_without_leaving_flights(tmp_path: Path) -> None:
    reader, _, node, _ = make(tmp_path)
    good = node.chunks[0]
    bad = Chunk(100, 100, 100, 200, 0, "sha256:../../escape", "none")
    odd = Node(ino=98, kind=NodeKind.REG, mode=0o644, size=200, chunks=[good, bad])
    with pytest.raises(FormatError, match="malformed chunk digest"):
        await reader.read(odd, 0, 200)
    assert reader._inflight == {}
    assert await reader.read(node, 0, 100) == DATA[:100]


async def test_misses_and_read_ahead_are_reported_as_activity_hits_are_not(
        tmp_path: Path) -> None:
    from snapshotter.fs.read.activity import Activity

    notes: list[str] = []

    class Recorder(Activity):
        def note(self) -> None:
            notes.append("note")

    b = LayerBuilder()
    node = b.file(ROOT_INO, "f", DATA, chunk_size=100)
    _, blob = b.build()
    reader = ChunkReader({"": FakeFetcher(blob)}, ChunkCache(tmp_path, 1 << 30),
                         readahead_chunks=2, activity=Recorder(None))
    assert await reader.read(node, 0, 50) == DATA[:50]  # miss
    assert notes == ["note"]
    assert await reader.read(node, 50, 100) == DATA[50:150]  # miss of chunk 1, sequential
    await reader.wait_idle()
    assert len(notes) == 2 + reader.counters.readahead_chunks > 2
    before = len(notes)
    assert await reader.read(node, 0, 100) == DATA[:100]  # cached: no activity
    assert len(notes) == before


async def test_fetch_all_awaits_the_gate_before_every_batch(tmp_path: Path) -> None:
    data = b"".join(i.to_bytes(4, "big") * (1 << 16) for i in range(4))  # 4 distinct chunks
    b = LayerBuilder()
    node = b.file(ROOT_INO, "big", data, chunk_size=1 << 18)
    _, blob = b.build()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path, 1 << 30))
    gates: list[int] = []

    async def gate() -> None:
        gates.append(len(fetcher.calls))  # how many batches went before this wait

    assert await reader.fetch_all([node], batch_bytes=1 << 19, gate=gate) == len(data)
    assert gates == [0, 1] and len(fetcher.calls) == 2


async def test_a_miss_is_amplified_to_the_following_chunks_of_the_blob(tmp_path: Path) -> None:
    b = LayerBuilder()
    files = [b.file(ROOT_INO, name, name.encode() * 50) for name in ("a", "b", "c", "d")]
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    a, bb, c, d = files
    budget = c.chunks[0].blob_end - a.chunks[0].blob_end  # reaches exactly to the end of c
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path, 1 << 30), amplify_bytes=budget,
                         layout=[ch for n in index.nodes.values() for ch in n.chunks])
    assert await reader.read(a, 0, 10) == b"aaaaaaaaaa"
    await reader.wait_idle()
    # The miss goes alone (its answer is not held up by the extra bytes); b and c go in a
    # second request sent at the same time.
    assert fetcher.calls == [[(0, 50)], [(50, 100), (100, 150)]]
    assert reader.counters.amplified_chunks == 2
    assert await reader.read(bb, 0, 1000) == b"b" * 50
    assert await reader.read(c, 0, 1000) == b"c" * 50
    assert len(fetcher.calls) == 2  # served from the cache
    assert await reader.read(d, 0, 1000) == b"d" * 50  # past the budget: its own miss
    assert len(fetcher.calls) == 3


async def test_amplification_skips_cached_chunks_and_is_off_by_default(tmp_path: Path) -> None:
    b = LayerBuilder()
    files = [b.file(ROOT_INO, name, name.encode() * 50) for name in ("a", "b", "c")]
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    layout = [ch for n in index.nodes.values() for ch in n.chunks]
    cache = ChunkCache(tmp_path, 1 << 30)
    plain = ChunkReader({"": fetcher}, cache, layout=layout)
    assert await plain.read(files[1], 0, 5) == b"bbbbb"
    await plain.wait_idle()
    assert plain.counters.amplified_chunks == 0
    wide = ChunkReader({"": fetcher}, cache, layout=layout, amplify_bytes=1 << 20)
    assert await wide.read(files[0], 0, 5) == b"aaaaa"
    await wide.wait_idle()
    assert wide.counters.amplified_chunks == 1  # c only: b is cached already
    assert fetcher.calls[-2:] == [
        [(files[0].chunks[0].blob_offset, files[0].chunks[0].blob_end)],
        [(files[2].chunks[0].blob_offset, files[2].chunks[0].blob_end)]]


def read_cached_into(reader: ChunkReader, node: Node, offset: int, length: int,
                     buf: memoryview) -> int | None:
    """What the FUSE session does with a READ: ``plan_cached``, then ``fill``; the bytes
    copied into ``buf``, or None when ``read`` must be used."""
    plan = reader.plan_cached(node, offset, length)
    if plan is None or not plan.fill(buf):
        return None
    return plan.size


async def test_cached_ranges_are_copied_into_a_buffer_without_fetching(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path)
    buf = memoryview(bytearray(2048))
    assert read_cached_into(reader, node, 150, 250, buf) is None  # nothing cached yet
    assert reader.counters.cache_hits == reader.counters.cache_misses == 0
    assert fetcher.calls == []
    assert await reader.read(node, 0, 2000) == DATA
    await reader.wait_idle()
    served = reader.counters.served_bytes
    assert read_cached_into(reader, node, 150, 250, buf) == 250
    assert bytes(buf[:250]) == DATA[150:400]
    assert read_cached_into(reader, node, 1000, 500, buf) == 28  # short at the end
    assert bytes(buf[:28]) == DATA[1000:]
    assert read_cached_into(reader, node, 1028, 10, buf) == 0
    assert reader.counters.served_bytes == served + 278
    await reader.aclose()
    assert read_cached_into(reader, node, 0, 10, buf) is None


async def test_a_chunk_in_flight_is_left_to_the_slow_path(tmp_path: Path) -> None:
    reader, fetcher, node, _ = make(tmp_path)
    await reader.read(node, 0, 100)
    await reader.wait_idle()
    fetcher.gate = asyncio.Event()
    pending = asyncio.ensure_future(reader.read(node, 100, 100))
    await fetcher.started.wait()
    buf = memoryview(bytearray(256))
    assert read_cached_into(reader, node, 50, 100, buf) is None  # chunk 1 is being fetched
    assert read_cached_into(reader, node, 0, 100, buf) == 100
    fetcher.gate.set()
    assert await pending == DATA[100:200]


class HintedCache(ChunkCache):
    """Records which chunks a reader asks to have read from disk ahead."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, 1 << 30)
        self.hinted: list[str] = []

    def will_need(self, key: str) -> bool:
        found = super().will_need(key)
        if found:
            self.hinted.append(key)
        return found


async def test_sequential_reads_of_cached_chunks_ask_for_the_next_files_early(
        tmp_path: Path) -> None:
    b = LayerBuilder()
    node = b.file(ROOT_INO, "f", DATA, chunk_size=100)
    _, blob = b.build()
    fetcher = FakeFetcher(blob)
    cache = HintedCache(tmp_path / "cache")
    warm = ChunkReader({"": fetcher}, cache)
    assert await warm.read(node, 0, 2000) == DATA
    await warm.wait_idle()
    reader = ChunkReader({"": fetcher}, cache, readahead_chunks=3)
    buf = memoryview(bytearray(256))
    assert read_cached_into(reader, node, 0, 100, buf) == 100
    assert cache.hinted == []  # one read is not a sequence yet
    assert read_cached_into(reader, node, 100, 100, buf) == 100
    keys = [chunk_key(c, fetcher.digest) for c in node.chunks]
    assert cache.hinted == keys[2:5]
    assert reader.counters.readahead_chunks == 0 and len(fetcher.calls) == 1


async def test_a_big_file_read_to_its_end_is_stored_whole_and_served_from_there(
        tmp_path: Path) -> None:
    data = bytes(range(256)) * (WHOLE_FILE_MIN_BYTES // 256) + b"end"
    reader, fetcher, node, cache = make(tmp_path, data, chunk_size=3 << 20)
    assert len(node.chunks) == 3
    assert reader.whole_file_path(node) is None
    assert await reader.read(node, 0, len(data)) == data
    await reader.wait_idle()
    path = reader.whole_file_path(node)
    assert path is not None and Path(path).read_bytes() == data
    plan = reader.plan_cached(node, 5 << 20, 1 << 20)
    assert plan is not None and len(plan.parts) == 1 and plan.parts[0][0].startswith("file:")
    buf = memoryview(bytearray(1 << 20))
    assert plan.fill(buf) and bytes(buf) == data[5 << 20 : 6 << 20]
    assert await reader.read(node, len(data) - 10, 100) == data[-10:]
    fresh = ChunkReader({"": fetcher}, cache)  # another reader finds the stored copy
    assert fresh.whole_file_path(node) == path
    Path(path).unlink()  # evicted (by another process): reads go back to the chunks
    cache.close()  # (an open descriptor would still serve the same bytes)
    assert await fresh.read(node, 100, 50) == data[100:150]
    assert fresh.whole_file_path(node) is None
    assert len(fetcher.calls) == 1


async def test_small_files_are_never_stored_whole(tmp_path: Path) -> None:
    reader, _, node, _ = make(tmp_path)
    assert await reader.read(node, 0, 2000) == DATA
    await reader.wait_idle()
    assert reader.whole_file_path(node) is None
