"""The layers of one FUSE daemon: each one's life cycle, from its spec to its last read.

``LayerManager`` (the control socket's ``DaemonCore``) owns the layers. Adding a layer
starts one owned task that, in order: opens the blob through the ``BlobSource``, reads and
verifies the index (``open_layer`` of the layer's format: footer + TOC, TOC digest checked
unless the spec allows skipping; a nydus RAFS layer reads its bootstrap from the file
``spec.bootstrap``, and its chunks through one fetcher per data blob, ``sha256:<blob id>``
of ``spec.ref``), adds the layer to the FUSE operations, prefetches
(``fetchpolicy``), marks the layer ready, then fetches the rest in the background when
asked. A layer that cannot be opened is not served; its ``error`` reads
``<reason>: <detail>`` with the reason from ``daemonapi.reasons`` (``reason_for``: a
malformed index is ``format_error``, a registry timeout ``registry_unavailable``; an
index over a parsing budget ``limit_exceeded``; ``resource_limit`` when the daemon ran
out of its memory limit while opening it: the layer is refused, the daemon's other
layers keep serving).

Every log line about a layer carries ``[layer <digest>]``.
"""


from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.daemonapi.enums import RAFS_FORMATS, DaemonMode, LayerFormat
from snapshotter.daemonapi.reasons import DAEMON, reason_for
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.daemonapi.status import DaemonStatus, LayerStatus
from snapshotter.errdefs import (
    AlreadyExists,
    DaemonError,
    DigestMismatch,
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    NoTocDigest,
    Unavailable,
)
from snapshotter.formats.index import LayerIndex
from snapshotter.formats.limits import TocLimits
from snapshotter.fs.ops import (
    MAX_LAYER_ID,
    LayerOperations,
    MountedLayer,
)
from snapshotter.fs.read.activity import Activity
from snapshotter.fs.read.dirahead import DirectoryAhead
from snapshotter.fs.read.fetchpolicy import FetchPolicy, FetchProgress, startup_nodes
from snapshotter.fs.read.reader import ChunkReader, ReaderCounters
from snapshotter.metrics.counters import DaemonCounters
from snapshotter.osutil.proc import rss_bytes
from snapshotter.registry.base import BlobFetcher

log = logging.getLogger(__name__)

LayerOpener = Callable[[BlobFetcher, str | None], Awaitable[tuple[LayerIndex, bytes]]]


class BlobSource(Protocol):
    """Where blob fetchers come from (the registry client in production)."""

    async def open_blob(self, ref: str, digest: str, size: int | None = None) -> BlobFetcher:
        """A fetcher of blob ``digest`` in ``ref``'s repository; ``size``, when known,
        spares the size request."""
        ...

    async def aclose(self) -> None: ...


def default_openers(limits: TocLimits | None = None) -> dict[str, LayerOpener]:
    """Index readers by ``LayerSpec.format`` (eStargz within ``limits``, default
    ``TocLimits()``, and nydus RAFS v5/v6 bootstraps)."""
    from snapshotter.formats import estargz

    budget = TocLimits() if limits is None else limits

    async def open_estargz(fetcher: BlobFetcher, digest: str | None) -> tuple[LayerIndex,
                                                                             bytes]:
        return await estargz.open_layer(fetcher, digest, limits=budget)

    openers: dict[str, LayerOpener] = {LayerFormat.ESTARGZ: open_estargz}
    openers.update(dict.fromkeys(RAFS_FORMATS, _open_rafs))
    return openers




async def _open_rafs(fetcher: BlobFetcher, digest: str | None) -> tuple[LayerIndex, bytes]:
    """The RAFS opener, imported on first use: it pulls in the nydus modules (zstd,
    tarfile), which an eStargz daemon never needs."""
    from snapshotter.fs import rafs_opener

    return await rafs_opener.open_layer(fetcher, digest)


class LayerLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[layer <digest>]``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[layer {self.extra['digest'] if self.extra else '?'}] {msg}", kwargs




@dataclass(eq=False)
class _Layer:
    spec: LayerSpec
    log: LayerLog
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    progress: FetchProgress = field(default_factory=FetchProgress)
    ready: bool = False
    error: str | None = None
    fetcher: BlobFetcher | None = None
    blob_fetchers: list[BlobFetcher] = field(default_factory=list)
    reader: ChunkReader | None = None
    index: LayerIndex | None = None
    task: asyncio.Task[None] | None = None
    warm_up: asyncio.Task[None] | None = None

    def status(self) -> LayerStatus:
        return LayerStatus(
            layer_id=self.spec.layer_id,
            digest=self.spec.digest,
            ready=self.ready,
            error=self.error,
            fetched_bytes=self.reader.counters.fetched_bytes if self.reader else 0,
            total_bytes=self.index.blob_size if self.index else 0,
            fully_fetched=self.progress.fully_fetched,
            prefetch_done=self.progress.prefetch_done,
        )


def failure_reason(exc: BaseException) -> str:
    """The reason token for why a layer could not be opened (``daemonapi.reasons``)."""
    return str(reason_for(exc, DAEMON))


class LayerManager:
    """The layers of one daemon; implements ``control.DaemonCore``.

    Every layer task is owned here; ``aclose`` cancels them, fails ready-waiters with
    "daemon is stopping", and closes readers and fetchers. ``counters`` (published in the
    status) gets each layer's finished prefetch and background fetch.
    """

    def __init__(
        self,
        *,
        mode: str,
        mountpoint: str,
        ops: LayerOperations,
        cache: ChunkCache,
        source: BlobSource,
        openers: Mapping[str, LayerOpener] | None = None,
        counters: DaemonCounters | None = None,
        limits: TocLimits | None = None,
    ) -> None:
        self.mode = mode
        self._limits = TocLimits() if limits is None else limits
        self.mountpoint = mountpoint
        self.counters = counters if counters is not None else DaemonCounters()
        self.state = "starting"
        self.stop_requested = asyncio.Event()
        self._ops = ops
        self._cache = cache
        self._source = source
        self._openers = dict(openers) if openers is not None else default_openers(
            self._limits)
        self._layers: dict[int, _Layer] = {}
        self._activities: dict[str | None, Activity] = {}

    def activity(self, path: str | None) -> Activity:
        """The one ``Activity`` of this daemon for ``path`` (layers share it)."""
        found = self._activities.get(path)
        if found is None:
            found = self._activities[path] = Activity(path)
        return found

    def status(self) -> DaemonStatus:
        totals = ReaderCounters()
        for layer in self._layers.values():
            if layer.reader is not None:
                for name, value in asdict(layer.reader.counters).items():
                    setattr(totals, name, getattr(totals, name) + value)
        return DaemonStatus(
            state=self.state,
            pid=os.getpid(),
            mode=self.mode,
            mountpoint=self.mountpoint,
            layers=[layer.status() for _, layer in sorted(self._layers.items())],
            cache=asdict(self._cache.stats()),
            reader=asdict(totals),
            rss_bytes=rss_bytes(),
            counters=self.counters.to_json(),
        )

    async def add_layer(self, spec: LayerSpec) -> LayerStatus:
        """Start mounting ``spec`` in the background; see the module docstring."""
        if self.state == "stopping":
            raise Unavailable("daemon is stopping")
        if spec.layer_id in self._layers:
            raise AlreadyExists(f"layer {spec.layer_id} exists")
        if self.mode == DaemonMode.DEDICATED and self._layers:
            raise FailedPrecondition("a dedicated daemon serves exactly one layer")
        if spec.format not in self._openers:
            raise InvalidArgument(f"no reader for layer format {spec.format!r}")
        if self.mode == DaemonMode.SHARED and not 1 <= spec.layer_id <= MAX_LAYER_ID:
            raise InvalidArgument(f"shared-mode layer ids are 1..{MAX_LAYER_ID}")
        layer = _Layer(spec=spec, log=LayerLog(log, {"digest": spec.digest}))
        self._layers[spec.layer_id] = layer
        self.activity(spec.activity_file).note()  # a mount is part of a pull: not quiet
        layer.task = asyncio.get_running_loop().create_task(self._run(layer))
        return layer.status()

    async def remove_layer(self, layer_id: int) -> None:
        """Stop serving a layer and release it; raises NotFound."""
        layer = self._layers.pop(layer_id, None)
        if layer is None:
            raise NotFound(f"layer {layer_id} is not in this daemon")
        await self._close_layer(layer, "layer removed")
        layer.log.info("removed")

    async def wait_ready(self, layer_id: int, timeout: float) -> LayerStatus:
        """See ``control.DaemonCore.wait_ready``."""
        layer = self._layers.get(layer_id)
        if layer is None:
            raise NotFound(f"layer {layer_id} is not in this daemon")
        try:
            async with asyncio.timeout(timeout):
                await layer.settled.wait()
        except TimeoutError:
            raise TimeoutError(f"layer {layer_id} not ready after {timeout}s") from None
        if layer.error is not None:
            raise DaemonError(layer.error)
        return layer.status()

    def request_shutdown(self) -> None:
        self.stop_requested.set()

    async def aclose(self) -> None:
        """Stop every layer; idempotent."""
        self.state = "stopping"
        layers, self._layers = list(self._layers.values()), {}
        for layer in layers:
            await self._close_layer(layer, "unavailable: daemon is stopping")

    async def _close_layer(self, layer: _Layer, why: str) -> None:
        if not layer.settled.is_set():
            layer.error = why
            layer.settled.set()
        for task in (layer.task, layer.warm_up):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if layer.spec.layer_id in self._ops.layers:
            self._ops.remove_layer(layer.spec.layer_id)
        if layer.reader is not None:
            await layer.reader.aclose()
        for fetcher in [layer.fetcher, *layer.blob_fetchers]:
            if fetcher is not None:
                with contextlib.suppress(Exception):
                    await fetcher.aclose()

    async def _run(self, layer: _Layer) -> None:
        """The life of one layer: open, mount, prefetch, ready, background fetch."""
        spec = layer.spec
        try:
            index, reader = await self._open(layer)
        except Exception as exc:
            reason = failure_reason(exc)
            layer.error = f"{reason}: {exc}"
            layer.log.error("cannot mount: %s", layer.error, exc_info=reason == "internal")
            layer.settled.set()
            return
        policy = FetchPolicy(
            prefetch_timeout_s=spec.prefetch_timeout_s,
            background=spec.background_fetch,
            background_rate_bytes_per_s=spec.background_rate_bytes_per_s,
            background_silence_s=spec.background_silence_s,
        )
        layer.warm_up = asyncio.get_running_loop().create_task(self._warm_up(layer))
        progress, fetch = layer.progress, self.counters.fetch
        await policy.prefetch(reader, index, progress, layer.log)
        fetch.record("prefetch", progress.prefetch_done, progress.prefetch_bytes,
                     progress.prefetch_seconds)
        layer.ready = True
        layer.settled.set()
        layer.log.info("ready (prefetch %s)", "done" if progress.prefetch_done else "skipped")
        await policy.background_fetch(reader, index, progress, layer.log,
                                      self.activity(spec.activity_file))
        if policy.background:
            fetch.record("background", progress.fully_fetched, progress.background_bytes,
                         progress.background_seconds)

    async def _open(self, layer: _Layer) -> tuple[LayerIndex, ChunkReader]:
        spec = layer.spec
        if spec.toc_digest is None and not spec.skip_verify:
            raise NoTocDigest("no TOC digest given and verification may not be skipped")
        index = await asyncio.to_thread(self._local_toc, layer)
        if index is not None:
            layer.fetcher = await self._source.open_blob(spec.ref, spec.digest, spec.blob_size)
        elif spec.bootstrap is not None:
            from snapshotter.fs.rafs_opener import FileBlob

            layer.fetcher = FileBlob(spec.bootstrap, spec.digest)
        else:
            layer.fetcher = await self._source.open_blob(spec.ref, spec.digest)
        if index is None:
            index, _toc = await self._openers[spec.format](layer.fetcher, spec.toc_digest)
        reader = ChunkReader(
            await self._blob_fetchers(layer, index), self._cache,
            readahead_chunks=spec.readahead_chunks, logger=layer.log,
            activity=self.activity(spec.activity_file),
            layout=(c for node in index.nodes.values() for c in node.chunks),
            amplify_bytes=spec.amplify_bytes,
            whole_file_bytes=spec.whole_file_bytes,
            dir_ahead=DirectoryAhead(index.nodes, budget_bytes=spec.dir_ahead_bytes,
                                     file_bytes=spec.dir_ahead_file_bytes)
            if spec.dir_ahead_bytes else None,
            on_ahead=self.counters.fetch.record,
        )
        layer.index, layer.reader = index, reader
        self._ops.add_layer(MountedLayer(spec.layer_id, spec.digest, index, reader))
        layer.log.info(
            "mounted: %d inodes, %d data bytes, blob %d bytes",
            len(index.nodes), index.total_data_bytes(), index.blob_size,
        )
        return index, reader


    async def _warm_up(self, layer: _Layer) -> None:
        """Open a registry connection (and get a token, if the registry wants one) while
        the pull goes on: a layer mounted from its TOC file has made no request yet, and
        the container's first miss would otherwise pay the TCP handshake (1.5 round
        trips) and the authentication on top of its own round trip. The request fetches
        the layer's start-up files (``fetchpolicy.startup_nodes``) if it has any, else
        one byte. A failure only means the first miss pays after all."""
        try:
            nodes = startup_nodes(layer.index) if layer.index is not None else []
            if nodes and layer.reader is not None:
                await layer.reader.fetch_all(nodes)
                return
            if layer.blob_fetchers:  # nydus: the data blobs (the bootstrap is a local file)
                fetcher: BlobFetcher | None = layer.blob_fetchers[0]
            else:
                fetcher = layer.fetcher if layer.spec.bootstrap is None else None
            if fetcher is not None and await fetcher.size() > 0:
                await fetcher.fetch([(0, 1)])
        except Exception as exc:  # best effort by design
            layer.log.debug("registry warm-up failed: %s", exc)

    def _local_toc(self, layer: _Layer) -> LayerIndex | None:
        """The index from the spec's ``toc_file``; None (with a warning) when there is no
        file or it does not verify, so that the layer fetches its TOC itself."""
        spec = layer.spec
        if spec.toc_file is None or spec.blob_size is None or spec.toc_offset is None:
            return None
        from snapshotter.formats import estargz

        try:
            with open(spec.toc_file, "rb") as f:
                toc_json = f.read()
            return estargz.index_toc(toc_json, spec.blob_size, spec.toc_offset,
                                     spec.toc_digest, limits=self._limits)
        except LimitExceeded:
            raise  # fetching it again gives the same TOC: refuse the layer now
        except (OSError, FormatError, DigestMismatch) as exc:
            layer.log.warning("TOC file %s not used (%s); fetching the TOC", spec.toc_file, exc)
            return None

    async def _blob_fetchers(self, layer: _Layer, index: LayerIndex) -> dict[str, BlobFetcher]:
        """The reader's fetchers: ``""`` is the layer's blob, and each other blob a chunk
        names (nydus data blobs) is ``sha256:<blob id>`` in the layer's repository."""
        assert layer.fetcher is not None
        fetchers: dict[str, BlobFetcher] = {"": layer.fetcher}
        for blob in sorted({c.blob for n in index.nodes.values() for c in n.chunks} - {""}):
            fetcher = await self._source.open_blob(layer.spec.ref, f"sha256:{blob}")
            layer.blob_fetchers.append(fetcher)
            fetchers[blob] = fetcher
        return fetchers
