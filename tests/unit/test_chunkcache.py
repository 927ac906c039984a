"""The on-disk chunk cache: layout, atomic writes, LRU eviction, several processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from snapshotter.cache.chunkcache import ChunkCache, chunk_key
from snapshotter.errdefs import FormatError
from snapshotter.formats.index import Chunk


def key_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def files_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_get_round_trip_and_layout(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    data = b"hello chunk"
    key = key_of(data)
    assert cache.get(key) is None
    assert cache.put(key, data)
    hexd = key.split(":")[1]
    assert (tmp_path / "sha256" / hexd[:2] / hexd).read_bytes() == data
    assert cache.get(key) == data
    assert cache.read(key, 6, 5) == b"chunk"
    assert cache.contains(key)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes_stored, stats.size_bytes) == (2, 1, 11, 11)
    assert stats.limit_bytes == 1 << 20


def test_short_file_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    key = key_of(b"0123456789")
    path = cache.path_for(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"01234")  # as after a crash without fsync
    assert cache.read(key, 0, 10) is None
    assert not path.exists()
    assert cache.put(key, b"0123456789")
    assert cache.read(key, 0, 10) == b"0123456789"


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ChunkCache(tmp_path, 1 << 20, fsync=True)
    key = key_of(b"data")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        cache.put(key, b"data")
    assert files_in(tmp_path) == []
    assert cache.get(key) is None


def test_keys_are_validated(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    for bad in ("sha256:../../etc/passwd", "sha256:", "nonsense", "SHA256:" + "a" * 64):
        with pytest.raises(ValueError):
            cache.get(bad)
    chunk = Chunk(0, 4, 10, 20, 0, "sha256:../x", "gzip")
    with pytest.raises(FormatError):
        chunk_key(chunk, "sha256:" + "b" * 64)


def test_positional_keys_for_chunks_without_digest() -> None:
    blob = "sha256:" + "c" * 64
    base = Chunk(0, 100, 10, 50, 0, "", "zstd")
    k = chunk_key(base, blob)
    assert k.startswith("pos:") and k == chunk_key(base, blob)
    variants = [
        Chunk(0, 100, 11, 50, 0, "", "zstd"),
        Chunk(0, 100, 10, 50, 1, "", "zstd"),
        Chunk(0, 101, 10, 50, 0, "", "zstd"),
    ]
    keys = {chunk_key(v, blob) for v in variants} | {chunk_key(base, "sha256:" + "d" * 64)}
    assert k not in keys and len(keys) == 4
    # a chunk with a digest is keyed by it, whatever blob holds it
    with_digest = Chunk(0, 1, 0, 1, 0, "sha256:" + "e" * 64, "gzip")
    assert chunk_key(with_digest, blob) == with_digest.digest


def test_lru_eviction_keeps_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 3000, low_watermark=1.0, touch_interval_s=0.0)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    keys = [key_of(b) for b in blobs]
    for i in range(3):
        cache.put(keys[i], blobs[i])
        os.utime(cache.path_for(keys[i]), (1_000_000 + i, 1_000_000 + i))  # distinct ages
    assert cache.get(keys[0]) == blobs[0]  # a hit makes chunk 0 the most recent
    cache.put(keys[3], blobs[3])  # over the limit: the oldest (chunk 1) goes
    assert cache.get(keys[1]) is None
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    stats = cache.stats()
    assert stats.evictions == 1 and stats.size_bytes == 3000


def test_eviction_down_to_low_watermark(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 10_000, low_watermark=0.5)
    for i in range(11):
        data = i.to_bytes(2, "big") * 500
        cache.put(key_of(data), data)
        os.utime(cache.path_for(key_of(data)), (1_000_000 + i, 1_000_000 + i))
    stats = cache.stats()
    assert stats.size_bytes <= 5000
    assert sum(p.stat().st_size for p in files_in(tmp_path)) == stats.size_bytes
    newest = 10 .to_bytes(2, "big") * 500
    assert cache.get(key_of(newest)) == newest


def test_size_is_rebuilt_from_disk_and_oversized_chunks_are_refused(tmp_path: Path) -> None:
    first = ChunkCache(tmp_path, 10_000)
    for i in range(3):
        data = bytes([i]) * 700
        first.put(key_of(data), data)
    second = ChunkCache(tmp_path, 10_000)
    assert second.stats().size_bytes == 2100
    assert not second.put(key_of(b"z" * 10_001), b"z" * 10_001)


def test_stale_temporary_files_are_removed_by_a_scan(tmp_path: Path) -> None:
    stale = tmp_path / "sha256" / "ab" / ".tmp-1-2-abcd"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    os.utime(stale, (1_000_000, 1_000_000))
    cache = ChunkCache(tmp_path, 1000)
    assert stale.exists()  # opening the cache does not scan it (daemon start-up)
    assert cache.stats().size_bytes == 0 and not stale.exists()  # the first need does


# --- several processes ---------------------------------------------------------------------


def _worker(root: str, seed: int, rounds: int) -> tuple[int, int]:
    """Put and read random chunks in a small shared cache; check every byte read."""
    cache = ChunkCache(root, 40_000, low_watermark=0.7, touch_interval_s=0.0)
    rng = random.Random(seed)
    hits = bad = 0
    for _ in range(rounds):
        n = rng.randrange(64)
        data = n.to_bytes(1, "big") * (1000 + n * 10)
        key = key_of(data)
        if rng.random() < 0.5:
            cache.put(key, data)
        got = cache.get(key)
        if got is not None:
            hits += 1
            bad += got != data
        part = cache.read(key, 100, 200)
        if part is not None:
            bad += part != data[100:300]
    return hits, bad


def test_concurrent_processes_share_one_directory(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=4, mp_context=ctx) as pool:
        results = list(pool.map(_worker, [str(tmp_path)] * 4, range(4), [400] * 4))
    assert all(bad == 0 for _, bad in results), results
    assert sum(hits for hits, _ in results) > 0
    leftovers = [p for p in files_in(tmp_path) if p.name.startswith(".tmp-")]
    assert leftovers == []
    for path in files_in(tmp_path):  # every stored file is complete and matches its name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    final = ChunkCache(tmp_path, 40_000)
    data = b"\xff" * 5000
    final.put(key_of(data), data)
    assert final.stats().size_bytes <= 40_000


# --- open files ----------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hot_files_stay_open_up_to_the_limit(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20, open_files=2)
    blobs = [bytes([i]) * 100 for i in range(3)]
    for b in blobs:
        cache.put(key_of(b), b)
    before = open_fds()
    assert cache.read(key_of(blobs[0]), 10, 5) == blobs[0][10:15]
    # another process evicts the file: still readable through the open descriptor
    os.unlink(cache.path_for(key_of(blobs[0])))
    assert cache.read(key_of(blobs[0]), 0, 100) == blobs[0]
    for b in blobs[1:]:
        assert cache.get(key_of(b)) == b
    assert open_fds() == before + 2  # the least recently used one was closed
    assert cache.get(key_of(blobs[0])) is None  # reopened: gone from disk
    cache.close()
    assert open_fds() == before


def test_no_open_files_means_one_open_per_read(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20, open_files=0)
    data = b"x" * 100
    cache.put(key_of(data), data)
    before = open_fds()
    assert cache.read(key_of(data), 0, 10) == data[:10]
    assert open_fds() == before
    os.unlink(cache.path_for(key_of(data)))
    assert cache.read(key_of(data), 0, 10) is None
    with pytest.raises(ValueError):
        ChunkCache(tmp_path, 1 << 20, open_files=-1)


def test_evicted_and_damaged_files_are_not_served_from_open_descriptors(
        tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 2000, low_watermark=1.0, touch_interval_s=0.0)
    old, new = b"o" * 1000, b"n" * 1000
    cache.put(key_of(old), old)
    os.utime(cache.path_for(key_of(old)), (1_000_000, 1_000_000))
    assert cache.get(key_of(old)) == old  # open now (and touched)
    os.utime(cache.path_for(key_of(old)), (1_000_000, 1_000_000))
    cache.put(key_of(new), new)
    cache.put(key_of(b"3" * 1000), b"3" * 1000)  # over the limit: the oldest goes
    assert cache.get(key_of(old)) is None
    assert cache.stats().evictions == 1
    short = b"0123456789"
    cache.put(key_of(short), short)
    assert cache.read(key_of(short), 0, 4) == b"0123"  # open now
    with open(cache.path_for(key_of(short)), "r+b") as f:
        f.truncate(5)  # damaged behind the cache's back
    assert cache.read(key_of(short), 0, 10) is None
    assert not cache.path_for(key_of(short)).exists()


def test_threads_reading_through_a_small_table_get_the_right_bytes(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 22, open_files=3)
    blobs = [bytes([i]) * (1000 + i) for i in range(12)]
    for b in blobs:
        cache.put(key_of(b), b)
    before = open_fds()

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        bad = 0
        for _ in range(2000):
            b = rng.choice(blobs)
            off = rng.randrange(len(b))
            bad += cache.read(key_of(b), off, len(b) - off) != b[off:]
        return bad

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert sum(pool.map(reader, range(4))) == 0
    assert open_fds() <= before + 3
    cache.close()
    assert open_fds() == before


def test_read_into_fills_a_buffer_and_reports_misses_and_damage(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    data = bytes(range(200))
    key = key_of(data)
    cache.put(key, data)
    buf = memoryview(bytearray(300))
    assert cache.read_into(key, 10, buf[:50]) and bytes(buf[:50]) == data[10:60]
    assert cache.read_into(key, 0, buf[:0])
    missing = key_of(b"other")
    assert not cache.read_into(missing, 0, buf[:10])
    assert not cache.read_into(key, 150, buf[:100])  # past the end: damaged, removed
    assert cache.get(key) is None and files_in(tmp_path) == []
    with pytest.raises(ValueError):
        cache.read_into(key, -1, buf[:1])


def test_will_need_tells_whether_a_chunk_is_stored(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    key = key_of(b"abc")
    assert not cache.will_need(key)
    cache.put(key, b"abc")
    assert cache.will_need(key)
    assert cache.get(key) == b"abc"


def test_assemble_joins_stored_chunks_into_one_entry(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20)
    parts = [b"first-", b"second-", b"third"]
    for data in parts:
        cache.put(key_of(data), data)
    whole = "file:" + "ab" * 32
    assert cache.assemble(whole, [(key_of(d), len(d)) for d in parts])
    assert cache.get(whole) == b"".join(parts)
    assert cache.assemble(whole, [])  # already stored
    other = "file:" + "cd" * 32
    missing = [(key_of(parts[0]), 6), (key_of(b"not stored"), 10)]
    assert not cache.assemble(other, missing)
    assert not cache.assemble(other, [(key_of(parts[0]), 5)])  # a length that lies
    assert cache.get(other) is None
    assert not [p for p in files_in(tmp_path) if p.name.startswith(".tmp-")]
    small = ChunkCache(tmp_path / "small", 8)
    small.put(key_of(b"1234"), b"1234")
    assert not small.assemble(other, [(key_of(b"1234"), 4)] * 3)  # bigger than the cache
