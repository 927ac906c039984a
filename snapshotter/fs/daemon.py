"""The FUSE daemon process: configuration, the layer life cycle, and the mount itself.

``LayerManager`` (the control socket's ``DaemonCore``) owns the layers. Adding a layer
starts one owned task that, in order: opens the blob through the ``BlobSource``, reads and
verifies the index (``open_layer`` of the layer's format: footer + TOC, TOC digest checked
unless the spec allows skipping; a nydus RAFS layer reads its bootstrap from the file
``spec.bootstrap``, and its chunks through one fetcher per data blob, ``sha256:<blob id>``
of ``spec.ref``), adds the layer to the FUSE operations, prefetches
(``fetchpolicy``), marks the layer ready, then fetches the rest in the background when
asked. A layer that cannot be opened is not served; its ``error`` reads
``<reason>: <detail>`` with reason one of ``no_toc_digest``, ``digest_mismatch``,
``limit_exceeded`` (the index is over a parsing budget), ``format_error``,
``blob_not_found``, ``registry_auth``, ``registry_unavailable``, ``registry_error``,
``invalid_layer``, ``resource_limit`` (the daemon ran out of its memory limit while
opening it: the layer is refused, the daemon's other layers keep serving), ``internal``.

``Daemon.run`` is the process: mount FUSE (``fsname=lazysnap``, ``subtype=lazysnap``,
``ro``, ``default_permissions``, ``allow_other`` unless configured off), widen the mount's
kernel read-ahead window once the kernel's INIT is answered (``read_ahead_kib``), serve the
control socket, add the configured layers, then wait for SIGTERM/SIGINT, a ``shutdown``
request or an external unmount, and tear down: layers first (pending reads fail with EIO and
ready-waiters get "daemon is stopping" rather than hang), then the control socket, the
FUSE loop, the mount, and the registry connections.

Every log line about a layer carries ``[layer <digest>]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.errdefs import (
    AlreadyExists,
    BlobNotFound,
    ConfigError,
    DaemonError,
    DigestMismatch,
    FailedPrecondition,
    FormatError,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailable,
    StartupError,
    Unavailable,
)
from snapshotter.formats.index import LayerIndex
from snapshotter.formats.limits import TocLimits
from snapshotter.fs.control import (
    ControlServer,
    DaemonStatus,
    LayerSpec,
    LayerStatus,
    json_field,
)
from snapshotter.fs.fuse.kernel import set_read_ahead
from snapshotter.fs.fuse.session import FuseSession, MountOptions
from snapshotter.fs.ops import (
    MAX_LAYER_ID,
    FuseTimeouts,
    LayerOperations,
    MountedLayer,
    NullNotifier,
)
from snapshotter.fs.read.activity import Activity
from snapshotter.fs.read.dirahead import DirectoryAhead
from snapshotter.fs.read.fetchpolicy import FetchPolicy, FetchProgress, startup_nodes
from snapshotter.fs.read.reader import ChunkReader, ReaderCounters
from snapshotter.metrics.counters import DaemonCounters
from snapshotter.registry.base import BlobFetcher

log = logging.getLogger(__name__)

MODES = ("dedicated", "shared")
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

    openers: dict[str, LayerOpener] = {"estargz": open_estargz}
    openers.update(dict.fromkeys(RAFS_FORMATS, _open_rafs))
    return openers


RAFS_FORMATS = ("rafs-v5", "rafs-v6")  # rafs_opener.FORMATS (a test checks they agree)


async def _open_rafs(fetcher: BlobFetcher, digest: str | None) -> tuple[LayerIndex, bytes]:
    """The RAFS opener, imported on first use: it pulls in the nydus modules (zstd,
    tarfile), which an eStargz daemon never needs."""
    from snapshotter.fs import rafs_opener

    return await rafs_opener.open_layer(fetcher, digest)


class LayerLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[layer <digest>]``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[layer {self.extra['digest'] if self.extra else '?'}] {msg}", kwargs


# --- configuration ----------------------------------------------------------------------------

_CONFIG_KEYS = {
    "version", "cache_dir", "cache_limit_bytes", "cache_fsync", "registry", "entry_timeout",
    "attr_timeout", "log_level", "allow_other", "fuse_max_tasks", "layers", "read_ahead_kib",
    "fuse_spin_us", "memory_limit_bytes", "toc_limits",
}
DEFAULT_READ_AHEAD_KIB = 4096


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The ``--config`` JSON of a daemon. See ``from_json`` for keys and defaults."""

    cache_dir: str
    cache_limit_bytes: int
    registry: Mapping[str, Any] = field(default_factory=dict)
    entry_timeout: float = 3600.0
    attr_timeout: float = 3600.0
    log_level: str = "INFO"
    layers: tuple[LayerSpec, ...] = ()
    cache_fsync: bool = False
    allow_other: bool = True
    fuse_max_tasks: int = 64
    read_ahead_kib: int = DEFAULT_READ_AHEAD_KIB
    fuse_spin_us: int = 0
    memory_limit_bytes: int = 0
    toc_limits: TocLimits = field(default_factory=TocLimits)

    @classmethod
    def from_json(cls, raw: object, mode: str) -> DaemonConfig:
        """Validate the JSON object ``raw`` for ``mode``; raises ConfigError.

        Required: ``cache_dir`` (str), ``cache_limit_bytes`` (int > 0). Optional:
        ``version`` (1), ``registry`` (object, for ``snapshotter.registry.hosts``),
        ``entry_timeout``/``attr_timeout`` (seconds, 3600), ``log_level`` ("INFO"),
        ``layers`` (list of LayerSpec objects mounted at start; dedicated mode needs
        exactly one), ``cache_fsync`` (false), ``allow_other`` (true),
        ``fuse_max_tasks`` (64), ``read_ahead_kib`` (the kernel's read-ahead window on
        the mount, KiB, ``DEFAULT_READ_AHEAD_KIB``; 0 keeps the kernel's 128 KiB; see
        ``snapshotter.fs.fuse.kernel``), ``fuse_spin_us`` (0: how long the FUSE session polls
        for the next request before it sleeps; see ``snapshotter.fs.fuse.session``),
        ``memory_limit_bytes`` (0: the process's data-memory limit, applied by the entry
        point), ``toc_limits`` (object, ``TocLimits.to_json``: the TOC parsing budgets).
        Unknown keys are errors.
        """
        if not isinstance(raw, dict):
            raise ConfigError("daemon config must be a JSON object")
        unknown = set(raw) - _CONFIG_KEYS
        if unknown:
            raise ConfigError(f"unknown daemon config keys: {sorted(unknown)}")
        if raw.get("version", 1) != 1:
            raise ConfigError(f"unsupported daemon config version {raw.get('version')!r}")
        try:
            layers = tuple(LayerSpec.from_json(x) for x in _get(raw, "layers", list, []))
            config = cls(
                cache_dir=_get(raw, "cache_dir", str),
                cache_limit_bytes=_get(raw, "cache_limit_bytes", int),
                registry=_get(raw, "registry", dict, {}),
                entry_timeout=float(_get(raw, "entry_timeout", (int, float), 3600.0)),
                attr_timeout=float(_get(raw, "attr_timeout", (int, float), 3600.0)),
                log_level=_get(raw, "log_level", str, "INFO").upper(),
                layers=layers,
                cache_fsync=_get(raw, "cache_fsync", bool, False),
                allow_other=_get(raw, "allow_other", bool, True),
                fuse_max_tasks=_get(raw, "fuse_max_tasks", int, 64),
                read_ahead_kib=_get(raw, "read_ahead_kib", int, DEFAULT_READ_AHEAD_KIB),
                fuse_spin_us=_get(raw, "fuse_spin_us", int, 0),
                memory_limit_bytes=_get(raw, "memory_limit_bytes", int, 0),
                toc_limits=TocLimits.from_json(_get(raw, "toc_limits", dict, {})),
            )
        except InvalidArgument as exc:
            raise ConfigError(f"bad layer in daemon config: {exc}") from None
        if config.cache_limit_bytes <= 0 or config.fuse_max_tasks <= 0:
            raise ConfigError("cache_limit_bytes and fuse_max_tasks must be positive")
        if config.read_ahead_kib < 0 or config.fuse_spin_us < 0 \
                or config.memory_limit_bytes < 0:
            raise ConfigError("read_ahead_kib, fuse_spin_us and memory_limit_bytes must be "
                              ">= 0")
        if config.log_level not in logging.getLevelNamesMapping():
            raise ConfigError(f"unknown log level {config.log_level!r}")
        if mode == "dedicated" and len(config.layers) != 1:
            raise ConfigError("a dedicated daemon needs exactly one layer in 'layers'")
        return config


def _get(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *default: Any) -> Any:
    return json_field(raw, key, kind, *default, error=ConfigError, what="daemon config")


# --- layers -------------------------------------------------------------------------------------


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
    """The short reason token for why a layer could not be opened."""
    table: tuple[tuple[type[BaseException], str], ...] = (
        (NoTocDigest, "no_toc_digest"),
        (DigestMismatch, "digest_mismatch"),
        (LimitExceeded, "limit_exceeded"),
        (FormatError, "format_error"),
        (BlobNotFound, "blob_not_found"),
        (RegistryAuthError, "registry_auth"),
        (RegistryUnavailable, "registry_unavailable"),
        (RegistryError, "registry_error"),
        (InvalidArgument, "invalid_layer"),
        (MemoryError, "resource_limit"),
    )
    for kind, reason in table:
        if isinstance(exc, kind):
            return reason
    return "internal"


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
        if self.mode == "dedicated" and self._layers:
            raise FailedPrecondition("a dedicated daemon serves exactly one layer")
        if spec.format not in self._openers:
            raise InvalidArgument(f"no reader for layer format {spec.format!r}")
        if self.mode == "shared" and not 1 <= spec.layer_id <= MAX_LAYER_ID:
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


class NoTocDigest(InvalidArgument):
    """The spec gives no TOC digest and does not allow skipping verification."""


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 if /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# --- the process --------------------------------------------------------------------------------


def mount_options(config: DaemonConfig) -> MountOptions:
    """How a daemon mounts its file system (``lazysnap`` on the mount point, type
    ``fuse.lazysnap``, read-only, ``default_permissions``; ``allow_other`` unless
    configured off)."""
    return MountOptions(fsname="lazysnap", subtype="lazysnap", allow_other=config.allow_other)


class Daemon:
    """One daemon process's resources, opened in ``run`` and closed in reverse order.

    ``control_sock``: an already-listening socket to serve (socket activation by the
    manager); without it the daemon binds ``control_path`` itself. ``counters``: where the
    daemon counts FUSE requests and fetches (its status publishes them); the entry point
    passes the one whose registry part its registry client also counts into.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        mode: str,
        mountpoint: str,
        control_path: str,
        source: BlobSource,
        control_sock: Any = None,
        openers: Mapping[str, LayerOpener] | None = None,
        counters: DaemonCounters | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self._config = config
        self._mountpoint = mountpoint
        self._source = source
        self._cache = ChunkCache(
            config.cache_dir, config.cache_limit_bytes, fsync=config.cache_fsync
        )
        self._ops = LayerOperations(
            shared=mode == "shared",
            timeouts=FuseTimeouts(entry_s=config.entry_timeout, attr_s=config.attr_timeout),
        )
        self.counters = counters if counters is not None else DaemonCounters()
        self._session = FuseSession(
            self._ops, mountpoint, mount_options(config), max_tasks=config.fuse_max_tasks,
            spin_s=config.fuse_spin_us / 1e6,
            stats=self.counters.fuse, on_init=self._after_init,
        )
        self._ops.notifier = self._session
        self.manager = LayerManager(
            mode=mode, mountpoint=mountpoint, ops=self._ops, cache=self._cache,
            source=source, openers=openers, counters=self.counters,
            limits=config.toc_limits,
        )
        self._server = ControlServer(self.manager, control_path, sock=control_sock)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, a shutdown request or an external unmount.

        Raises StartupError when the mount or the control socket cannot be set up, and
        DaemonError when the FUSE loop fails, in both cases after undoing what was set up.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.manager.request_shutdown)
        try:
            self._session.mount()
        except OSError as exc:
            await self._source.aclose()
            raise StartupError(f"cannot mount FUSE at {self._mountpoint}: {exc}") from exc
        fuse_task = loop.create_task(self._session.serve())
        try:
            await self._serve(fuse_task)
        finally:
            await self._teardown(fuse_task)

    def _after_init(self) -> None:
        """Runs once the kernel has taken the INIT answer, which resets the read-ahead
        window to at most the kernel's default (``snapshotter.fs.fuse.kernel``)."""
        set_read_ahead(self._mountpoint, self._config.read_ahead_kib)

    async def _serve(self, fuse_task: asyncio.Task[None]) -> None:
        try:
            await self._server.start()
        except OSError as exc:
            raise StartupError(f"cannot serve the control socket: {exc}") from exc
        for spec in self._config.layers:
            await self.manager.add_layer(spec)
        self.manager.state = "running"
        log.info("serving %s at %s (pid %d)", self.manager.mode, self._mountpoint, os.getpid())
        stop = asyncio.ensure_future(self.manager.stop_requested.wait())
        try:
            await asyncio.wait({stop, fuse_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if fuse_task.done():
            log.warning("the FUSE session ended (unmounted from outside?); exiting")
        else:
            log.info("shutdown requested; exiting")

    async def _teardown(self, fuse_task: asyncio.Task[None]) -> None:
        """Undo ``run`` in reverse; raises DaemonError (after cleaning up) when the FUSE
        loop itself failed, so that the process exits non-zero."""
        self.manager.state = "stopping"
        self._ops.notifier = NullNotifier()  # the session is going away
        await self.manager.aclose()  # first: pending reads and ready-waiters fail fast
        await self._server.aclose()
        self._session.stop()
        failure: BaseException | None = None
        try:
            await fuse_task
        except Exception as exc:
            log.exception("the FUSE loop failed")
            failure = exc
        self._session.close()
        self._cache.close()
        await self._source.aclose()
        log.info("unmounted %s", self._mountpoint)
        if failure is not None:
            raise DaemonError(f"the FUSE loop failed: {failure}") from failure
