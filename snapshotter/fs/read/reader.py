"""Serve byte ranges of a layer's regular files from the chunk cache or the registry.

``ChunkReader`` owns the read path of one layer: for ``read(node, offset, length)`` it finds
the chunks that overlap the range, serves cached chunks straight from the disk cache (a
``pread`` of just the wanted slice), and fetches the others. The chunks missing for one read
are fetched with a single ``BlobFetcher.fetch`` call per blob (one range per distinct gzip
member), then decoded and verified in a worker thread, stored in the cache and sliced.

Guarantees:
  * single flight: while a chunk is being fetched, every other reader of that chunk waits
    for the same fetch instead of starting its own;
  * only verified bytes are served or cached: a chunk whose digest does not match raises
    ``DigestMismatch`` (from the decoder) and is not stored, so the next read tries again;
  * read-ahead: a file read sequentially gets its next ``readahead_chunks`` chunks fetched
    in the background (one fetch per chunk, so they arrive in order and overlap), which lets
    a sequential reader run at link rate rather than one round trip per chunk;
  * every background task belongs to the reader; ``aclose`` cancels them and fails their
    waiters with ``Unavailable``;
  * every on-demand miss and read-ahead is reported to the ``activity`` given (see
    ``activity.Activity``), which the background fetch waits on to stay out of the way;
  * amplified misses: with ``amplify_bytes`` > 0 and the layer's ``layout`` (every chunk of
    the layer), a miss also fetches the uncached chunks that follow it in the blob, of any
    file, up to ``amplify_bytes`` more compressed bytes, in a second request sent at the
    same time as the miss's own (so the miss is answered after its own bytes, not after
    the extra ones). Files that are read together usually sit together in the blob (one
    directory, one package), so one round trip then serves the next few misses; the cost is
    at most ``amplify_bytes`` of transfer per miss. The extra chunks are only cached.
  * directory read-ahead: with a ``dir_ahead`` (``snapshotter.fs.read.dirahead``), each miss is
    reported to it, and the files it names (a directory's other small files, once two of
    them have missed) are fetched in the background in batches of ``_AHEAD_BATCH_BYTES``,
    ``_AHEAD_PARALLEL`` at a time; a read of one of them waits for its batch instead of
    fetching again. A failed read-ahead is logged; its files are then fetched on demand.
    ``on_ahead`` is told of each finished one (phase ``directory``).
  * whole files: once a big file (at least ``whole_file_bytes``, two chunks or more,
    chunks contiguous) has been read to its end with every chunk cached, its chunks are
    copied into one cache entry keyed by the file's chunk list (``ChunkCache.assemble``,
    in a worker thread), and later reads of the file are served from that one file: the
    kernel then reads it ahead as one stream instead of one chunk file at a time.

Failure modes of ``read``/``fetch_all``: whatever the fetcher raises (``RegistryError`` and
subclasses), ``DigestMismatch``/``FormatError`` from decoding, ``FormatError`` for an
unsupported compression, ``Unavailable`` after ``aclose``.

Decoding dispatches on ``Chunk.compression`` through a table of ``Decoder`` functions
(``decode.DEFAULT_DECODERS``); where chunks sit in their blobs is ``layout``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from snapshotter.cache.chunkcache import ChunkCache, chunk_key
from snapshotter.errdefs import FormatError, Unavailable
from snapshotter.formats.index import Chunk, Node, NodeKind
from snapshotter.fs.read.activity import Activity
from snapshotter.fs.read.decode import DEFAULT_DECODERS, Decoder
from snapshotter.fs.read.dirahead import DirectoryAhead
from snapshotter.fs.read.layout import BlobLayout, chunk_span, compressed_size
from snapshotter.fs.read.wholefile import WHOLE_FILE_MIN_BYTES, WholeFiles
from snapshotter.registry.base import BlobFetcher

log = logging.getLogger(__name__)

AheadRecorder = Callable[[str, bool, int, float | None], None]
"""``record(phase, complete, fetched_bytes, seconds)``: told of each finished directory
read-ahead (``FetchTotals.record``'s signature)."""

_SEQ_TRACKED = 1024
_BATCH_BYTES = 4 << 20
_INLINE_DECODE_BYTES = 64 << 10
# A directory read-ahead goes in batches of this many compressed bytes, this many at once:
# a miss that comes meanwhile queues behind at most that much on the link.
_AHEAD_BATCH_BYTES = 256 << 10
_AHEAD_PARALLEL = 2


@dataclass(slots=True)
class ReaderCounters:
    """Monotonic counters of one reader. Cache hits/misses count chunks, not bytes."""

    fetched_bytes: int = 0
    served_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    readahead_chunks: int = 0
    amplified_chunks: int = 0
    dir_ahead_files: int = 0
    dir_ahead_bytes: int = 0


@dataclass(frozen=True, slots=True)
class CachedRange:
    """Bytes of a read that are all in the cache: ``parts`` are (cache key, offset in
    that entry, length) in order, ``size`` their total."""

    cache: ChunkCache
    parts: tuple[tuple[str, int, int], ...]
    size: int

    def fill(self, buf: memoryview) -> bool:
        """Copy the bytes into ``buf``; False when an entry is gone (thread-safe)."""
        pos = 0
        for key, offset, length in self.parts:
            if not self.cache.read_into(key, offset, buf[pos : pos + length]):
                return False
            pos += length
        return True


@dataclass(slots=True)
class _Seq:
    """Sequential-access state of one file: where the last read ended, how far ahead."""

    end: int
    ahead: int  # index of the last chunk already scheduled for read-ahead


class ChunkReader:
    """Reads file ranges of one layer. See the module docstring for the contract.

    ``fetchers`` maps ``Chunk.blob`` to the blob's fetcher (``""`` = the layer blob).
    ``readahead_chunks`` = 0 disables read-ahead. ``sleep`` paces ``fetch_all`` (a test
    passes a fake); ``logger`` names the layer in messages; ``activity`` is told of every
    on-demand miss and read-ahead (default: a private one).
    """

    def __init__(
        self,
        fetchers: Mapping[str, BlobFetcher],
        cache: ChunkCache,
        *,
        readahead_chunks: int = 4,
        decoders: Mapping[str, Decoder] = DEFAULT_DECODERS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
        activity: Activity | None = None,
        layout: Iterable[Chunk] = (),
        amplify_bytes: int = 0,
        whole_file_bytes: int = WHOLE_FILE_MIN_BYTES,
        dir_ahead: DirectoryAhead | None = None,
        on_ahead: AheadRecorder | None = None,
    ) -> None:
        self._fetchers = dict(fetchers)
        self._dir_ahead = dir_ahead
        self._on_ahead = on_ahead
        self._amplify = max(0, amplify_bytes)
        self._layout = BlobLayout(layout if self._amplify else ())
        self.activity = activity if activity is not None else Activity(None)
        self._cache = cache
        self._readahead = max(0, readahead_chunks)
        self._decoders = dict(decoders)
        self._sleep = sleep
        self._log = logger
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq: OrderedDict[int, _Seq] = OrderedDict()
        self._key_tasks: dict[str, asyncio.Task[None]] = {}  # chunk key -> its fetch
        self._wholes = WholeFiles(cache, whole_file_bytes, self._key, logger)
        self._closed = False
        self.counters = ReaderCounters()

    # --- public API -------------------------------------------------------------------------

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of regular file ``node`` (short at EOF)."""
        if self._closed:
            raise Unavailable("reader is closed")
        end = min(node.size, offset + length)
        if node.kind is not NodeKind.REG or offset >= end:
            return b""
        whole = self._wholes.stored(node)
        if whole is not None:
            data = self._cache.read(whole, offset, end - offset)
            if data is not None:
                self.counters.cache_hits += 1
                self.counters.served_bytes += len(data)
                return data
            self._wholes.forget(node)  # evicted meanwhile: back to the chunks
        first, last = chunk_span(node.chunks, offset, end)
        # Keys first: they can raise, and nothing may be registered in flight before that.
        wanted = [(c, self._key(c)) for c in node.chunks[first : last + 1]]
        pieces: list[bytes] = []
        waits: list[tuple[int, asyncio.Future[bytes], int, int]] = []
        missing: list[tuple[Chunk, str]] = []
        for chunk, key in wanted:
            lo = max(offset, chunk.file_offset) - chunk.file_offset
            hi = min(end, chunk.file_offset + chunk.size) - chunk.file_offset
            fut = self._inflight.get(key)
            if fut is None:
                data = self._cache.read(key, lo, hi - lo)
                if data is not None:
                    self.counters.cache_hits += 1
                    pieces.append(data)
                    continue
                self.counters.cache_misses += 1
                fut = self._register(key)
                missing.append((chunk, key))
            pieces.append(b"")
            waits.append((len(pieces) - 1, fut, lo, hi))
        if missing:
            self.activity.note()
            self._spawn(missing)
            extra = self._amplified(missing)
            if extra:
                self._spawn(extra)
            if self._dir_ahead is not None:
                self._fetch_ahead(self._dir_ahead.missed(node))
        for pos, fut, lo, hi in waits:
            pieces[pos] = (await asyncio.shield(fut))[lo:hi]
        self._note_access(node, offset, end, last)
        if end == node.size:
            self._assemble_later(node)
        out = b"".join(pieces)
        self.counters.served_bytes += len(out)
        return out

    def plan_cached(self, node: Node, offset: int, length: int) -> CachedRange | None:
        """The fast path of ``read``: where the bytes of ``read(node, offset, length)``
        lie in the cache, when every chunk is stored and none is being fetched; the read
        is then accounted as served (counters, read-ahead, whole-file copy). None when a
        chunk is missing or in flight, or the reader is closed: then ``read`` must be used
        (it fetches, and raises what is wrong), and nothing has been accounted.

        ``CachedRange.fill`` copies the bytes and is safe in any thread; should a cache
        entry vanish in between (evicted by another process), it returns False and the
        caller falls back to ``read`` (the read is then accounted twice).
        """
        if self._closed:
            return None
        end = min(node.size, offset + length)
        if node.kind is not NodeKind.REG or offset >= end:
            return CachedRange(self._cache, (), 0)
        whole = self._wholes.stored(node)
        if whole is not None:
            self._wholes.ahead(node, whole, offset, end)
            parts: list[tuple[str, int, int]] = [(whole, offset, end - offset)]
            hits = 1
        else:
            first, last = chunk_span(node.chunks, offset, end)
            parts = []
            for chunk in node.chunks[first : last + 1]:
                try:
                    key = self._key(chunk)
                except FormatError:
                    return None
                if key in self._inflight or not self._cache.contains(key):
                    return None
                lo = max(offset, chunk.file_offset) - chunk.file_offset
                hi = min(end, chunk.file_offset + chunk.size) - chunk.file_offset
                parts.append((key, lo, hi - lo))
            self._note_access(node, offset, end, last)
            hits = last + 1 - first
        self.counters.cache_hits += hits
        self.counters.served_bytes += end - offset
        if end == node.size:
            self._assemble_later(node)
        return CachedRange(self._cache, tuple(parts), end - offset)

    # --- whole files ------------------------------------------------------------------------

    def whole_file_path(self, node: Node) -> str | None:
        """The cache file holding all of ``node``'s bytes when it has been assembled
        (see the module docstring), else None."""
        return None if self._closed else self._wholes.path(node)

    def _assemble_later(self, node: Node) -> None:
        """After a read reached the end of ``node``: assemble it in the background if it
        is big, not assembled yet and not being assembled."""
        key = None if self._closed else self._wholes.claim(node)
        if key is not None:
            self._background(self._assemble(node, key))

    async def _assemble(self, node: Node, key: str) -> None:
        """Wait for the file's chunks still being fetched and stored, then assemble it."""
        keys = [self._key(c) for c in node.chunks]
        pending = {self._key_tasks[k] for k in keys if k in self._key_tasks}
        if pending:
            await asyncio.wait(pending)
        await self._wholes.assemble(node, key)

    async def fetch_all(
        self,
        nodes: Iterable[Node],
        rate_limit_bytes_per_s: int = 0,
        *,
        batch_bytes: int = _BATCH_BYTES,
        gate: Callable[[], Awaitable[None]] | None = None,
        parallel: int = 1,
    ) -> int:
        """Make sure every chunk of ``nodes`` is in the cache; return compressed bytes fetched.

        Chunks are fetched in blob order in batches of about ``batch_bytes`` compressed,
        ``parallel`` batches at a time (one request each); ``gate`` (if given) is awaited
        before each batch (the background fetch waits there for quiet);
        ``rate_limit_bytes_per_s`` > 0 paces the batches so the average rate stays below
        it. Chunks already cached or being fetched by someone else are not fetched again.
        Raises the first fetch or verification error (the other batches are cancelled).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        fetched = 0
        batches = iter(self._batches(nodes, batch_bytes))

        async def worker() -> None:
            nonlocal fetched
            for batch in batches:
                if gate is not None:
                    await gate()
                size = await self._fetch_batch(batch)
                fetched += size
                if rate_limit_bytes_per_s > 0 and size:
                    due = started + fetched / rate_limit_bytes_per_s
                    await self._sleep(max(0.0, due - loop.time()))

        if parallel <= 1:
            await worker()
        else:
            try:
                async with asyncio.TaskGroup() as group:  # a failure cancels the others
                    for _ in range(parallel):
                        group.create_task(worker())
            except* Exception as failed:
                raise failed.exceptions[0] from None
        return fetched

    async def _fetch_batch(self, batch: list[tuple[Chunk, str]]) -> int:
        """Fetch the uncached chunks of ``batch`` and wait until all of it is stored;
        return the compressed bytes this call fetched."""
        futs: list[asyncio.Future[bytes]] = []
        missing: list[tuple[Chunk, str]] = []
        for chunk, key in batch:
            fut = self._inflight.get(key)
            if fut is None:
                if self._cache.contains(key):
                    continue
                fut = self._register(key)
                missing.append((chunk, key))
            futs.append(fut)
        tasks = self._spawn(missing) if missing else []
        for fut in futs:
            await asyncio.shield(fut)
        if tasks:  # until our chunks are stored, not just decoded; wait() never cancels
            await asyncio.wait(tasks)
        return compressed_size(c for c, _ in missing)

    def _fetch_ahead(self, nodes: list[Node]) -> None:
        """Fetch ``nodes`` (a directory read-ahead) in the background, a few batches at a
        time; a failure is logged, the files are then fetched on demand."""
        if not nodes or self._closed:
            return

        async def run() -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            fetched, ok = 0, False
            try:
                fetched = await self.fetch_all(nodes, batch_bytes=_AHEAD_BATCH_BYTES,
                                               parallel=_AHEAD_PARALLEL)
                self.counters.dir_ahead_bytes += fetched
                ok = True
            except Exception as exc:  # on demand later
                self._log.info("directory read-ahead of %d files failed: %s", len(nodes), exc)
            if self._on_ahead is not None:
                self._on_ahead("directory", ok, fetched, loop.time() - started)

        self.counters.dir_ahead_files += len(nodes)
        self._background(run())

    def is_cached(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` is in the cache now."""
        return self._cache.contains(self._key(chunk))

    async def wait_idle(self) -> None:
        """Wait until no background fetch (read-ahead included) is running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel background fetches; pending and later reads fail with Unavailable."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- fetching ---------------------------------------------------------------------------

    def _key(self, chunk: Chunk) -> str:
        fetcher = self._fetchers.get(chunk.blob)
        if fetcher is None:
            raise FormatError(f"chunk refers to unknown blob {chunk.blob!r}")
        return chunk_key(chunk, fetcher.digest)

    def _register(self, key: str) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # A read-ahead flight may fail with nobody awaiting it: mark the error as seen.
        fut.add_done_callback(_consume_exception)
        self._inflight[key] = fut
        return fut

    def _spawn(self, items: list[tuple[Chunk, str]]) -> list[asyncio.Task[None]]:
        """Start one owned fetch task per blob for ``items`` (their flights are registered).

        The tasks never raise (errors go to the flights' futures) except when cancelled.
        """
        by_blob: dict[str, list[tuple[Chunk, str]]] = {}
        for chunk, key in items:
            by_blob.setdefault(chunk.blob, []).append((chunk, key))
        tasks = []
        for blob, group in by_blob.items():
            task = self._background(self._fetch_group(blob, group))
            keys = [key for _, key in group]
            for key in keys:
                self._key_tasks[key] = task
            task.add_done_callback(functools.partial(self._fetched, keys=keys))
            tasks.append(task)
        return tasks

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` as a task the reader owns (``wait_idle`` waits for it, ``aclose``
        cancels it)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fetched(self, task: asyncio.Task[None], *, keys: list[str]) -> None:
        for key in keys:
            if self._key_tasks.get(key) is task:
                del self._key_tasks[key]

    async def _fetch_group(self, blob: str, items: list[tuple[Chunk, str]]) -> None:
        """Fetch, decode, verify, cache and publish ``items``; always settles their futures.

        Decoding and storing run in one worker-thread call each for the whole group (a
        thread hop per chunk costs more than decoding a small chunk); a group smaller
        than ``_INLINE_DECODE_BYTES`` is decoded on the loop.
        """
        try:
            ranges = sorted({(c.blob_offset, c.blob_end) for c, _ in items})
            datas = await self._fetchers[blob].fetch(ranges)
            self.counters.fetched_bytes += sum(len(d) for d in datas)
            by_range = dict(zip(ranges, datas, strict=True))
            work = [(c, by_range[(c.blob_offset, c.blob_end)]) for c, _ in items]
            if sum(len(d) for d in datas) <= _INLINE_DECODE_BYTES:
                decoded = self._decode_many(work)
            else:
                decoded = await asyncio.to_thread(self._decode_many, work)
            good: list[tuple[str, bytes]] = []
            for (_, key), result in zip(items, decoded, strict=True):
                fut = self._inflight[key]
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
                    good.append((key, result))
            if good:
                await asyncio.to_thread(self._store_many, good)
        except asyncio.CancelledError:
            self._fail(items, Unavailable("reader closed while fetching"))
            raise
        except Exception as exc:
            self._fail(items, exc)
        finally:
            for _, key in items:
                self._inflight.pop(key, None)

    def _decode_many(self, work: list[tuple[Chunk, bytes]]) -> list[bytes | Exception]:
        out: list[bytes | Exception] = []
        for chunk, compressed in work:
            try:
                out.append(self._decode(compressed, chunk))
            except Exception as exc:  # settles this chunk only; the others are fine
                out.append(exc)
        return out

    def _store_many(self, chunks: list[tuple[str, bytes]]) -> None:
        for key, data in chunks:
            try:
                self._cache.put(key, data)
            except OSError as exc:
                self._log.warning("chunk %s not cached: %s", key, exc)

    def _decode(self, compressed: bytes, chunk: Chunk) -> bytes:
        decoder = self._decoders.get(chunk.compression)
        if decoder is None:
            raise FormatError(f"unsupported chunk compression {chunk.compression!r}")
        data = decoder(compressed, chunk)
        if len(data) != chunk.size:
            raise FormatError(f"chunk decoded to {len(data)} bytes, expected {chunk.size}")
        return data

    def _fail(self, items: list[tuple[Chunk, str]], exc: BaseException) -> None:
        for _, key in items:
            fut = self._inflight.get(key)
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    def _batches(self, nodes: Iterable[Node], limit: int) -> list[list[tuple[Chunk, str]]]:
        seen: set[str] = set()
        items: list[tuple[Chunk, str]] = []
        for node in nodes:
            for chunk in node.chunks:
                key = self._key(chunk)
                if key not in seen:
                    seen.add(key)
                    items.append((chunk, key))
        items.sort(key=lambda it: (it[0].blob, it[0].blob_offset, it[0].inner_offset))
        batches: list[list[tuple[Chunk, str]]] = []
        size = 0
        for item in items:
            if not batches or size >= limit or batches[-1][0][0].blob != item[0].blob:
                batches.append([])
                size = 0
            batches[-1].append(item)
            size += item[0].blob_end - item[0].blob_offset
        return batches

    def _amplified(self, missing: list[tuple[Chunk, str]]) -> list[tuple[Chunk, str]]:
        """Uncached chunks following the misses in their blobs, registered in flight (see
        the module docstring); they go in the same fetch as ``missing``."""
        if not self._amplify:
            return []
        extra: list[tuple[Chunk, str]] = []
        last: dict[str, Chunk] = {}
        for chunk, _ in missing:
            if chunk.blob not in last or chunk.blob_end > last[chunk.blob].blob_end:
                last[chunk.blob] = chunk
        for tail in last.values():
            for chunk in self._layout.following(tail, self._amplify):
                key = self._key(chunk)
                if key in self._inflight or self._cache.contains(key):
                    continue
                self._register(key)
                extra.append((chunk, key))
        self.counters.amplified_chunks += len(extra)
        return extra

    # --- read-ahead -------------------------------------------------------------------------

    def _note_access(self, node: Node, offset: int, end: int, last: int) -> None:
        """Record the read and, when it continues the previous one, schedule read-ahead."""
        if self._readahead == 0 or self._closed:
            return
        state = self._seq.pop(node.ino, None)
        slack = max(end - offset, 128 << 10)
        sequential = state is not None and abs(offset - state.end) <= slack
        if state is None or not sequential:
            state = _Seq(end=end, ahead=last)
        state.end = end
        self._seq[node.ino] = state
        while len(self._seq) > _SEQ_TRACKED:
            self._seq.popitem(last=False)
        if not sequential:
            return
        start = max(state.ahead, last) + 1
        stop = min(len(node.chunks), last + 1 + self._readahead)
        for i in range(start, stop):
            chunk = node.chunks[i]
            try:
                key = self._key(chunk)
            except FormatError:
                break  # the read of that chunk will report it
            # A cached chunk is read from disk ahead instead (its file may have left the
            # page cache): a sequential reader then never waits for the disk either.
            if key in self._inflight or self._cache.will_need(key):
                continue
            self._register(key)
            self.counters.readahead_chunks += 1
            self.activity.note()
            self._spawn([(chunk, key)])
        state.ahead = max(state.ahead, stop - 1)


def _consume_exception(fut: asyncio.Future[bytes]) -> None:
    if not fut.cancelled():
        with contextlib.suppress(BaseException):
            fut.exception()
