"""App: opens lazysnap's resources in order, serves, and closes them in reverse.

Start-up order: root directory (created 0700, checked writable and overlay-capable),
metastore, metrics endpoint (when ``[metrics] address`` is set; bound early so that a
taken port fails start-up before any daemon is touched), registry client, daemon manager,
snapshotter, gRPC server. SIGTERM and SIGINT stop the server gracefully and
close everything; FUSE daemons (when there are any) are left running on purpose so that
running containers keep their layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from snapshotter.api.server import start_server, stop_server
from snapshotter.api.service import SnapshotsService
from snapshotter.config import Config
from snapshotter.errdefs import StartupError
from snapshotter.metastore.store import MetaStore
from snapshotter.metrics.endpoint import MetricsEndpoint
from snapshotter.metrics.families import Metrics
from snapshotter.osutil.mountutil import mount, unmount
from snapshotter.snapshot.remote import RemoteSnapshotter

log = logging.getLogger(__name__)


def prepare_root(root: str, check_overlay: bool) -> None:
    """Create ``root`` (0700) if missing; check that it is writable and takes overlays.

    Raises StartupError with a message saying what is wrong.
    """
    path = Path(root)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe_dir = tempfile.mkdtemp(prefix="probe-", dir=path)
    except OSError as e:
        raise StartupError(f"root {root} is not usable: {e.strerror}") from None
    try:
        if check_overlay:
            _probe_overlay(probe_dir)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def _probe_overlay(probe_dir: str) -> None:
    dirs = {n: os.path.join(probe_dir, n) for n in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        os.mkdir(d)
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    try:
        mount("overlay", dirs["merged"], "overlay", 0, opts)
    except OSError as e:
        raise StartupError(
            f"overlayfs cannot be mounted on {probe_dir}: {e.strerror}"
            " (lazysnap needs root and a file system that supports overlay upper dirs)"
        ) from None
    unmount(dirs["merged"])


class App:
    """The running service. ``run`` returns when a stop signal arrives.

    ``metrics`` lives on ``registry`` (a fresh one unless given): nothing is process-global.
    """

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.stop_event = asyncio.Event()
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())

    async def run(self) -> None:
        cfg = self.config
        address = cfg.metrics.address
        endpoint = MetricsEndpoint(self.metrics, address) if address else None
        prepare_root(cfg.root, cfg.snapshotter.check_overlay)
        store = MetaStore(Path(cfg.root) / "metadata.db")
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(store.close)
            if endpoint is not None:
                await endpoint.start()
                stack.push_async_callback(endpoint.aclose)
            snapshotter = await self._snapshotter(stack, store)
            service = SnapshotsService(snapshotter, observe=self.metrics.observe_call)
            server = await start_server(service, cfg.address)
            stack.push_async_callback(stop_server, server, cfg.address)
            self._install_signals()
            log.info("lazysnap serving on %s, root %s", cfg.address, cfg.root)
            await self.stop_event.wait()
            log.info("stopping")

    async def _snapshotter(
        self, stack: contextlib.AsyncExitStack, store: MetaStore
    ) -> RemoteSnapshotter:
        """The snapshotter with its remote layers served again (re-attached or restarted)."""
        from daemon_manager.manager import DaemonManager
        from snapshotter.daemonapi.specs import daemon_settings
        from snapshotter.lazy.layers import LazyLayers, registry_hosts
        from snapshotter.metrics.collector import Poller
        from snapshotter.metrics.counters import RegistryCounters
        from snapshotter.registry.registry import RegistryClient

        cfg = self.config
        counters = RegistryCounters()
        client = RegistryClient(registry_hosts(cfg), stats=counters.stats,
                                session_factory=counters.session_factory)
        stack.push_async_callback(client.aclose)
        manager = DaemonManager(daemon_settings(cfg), store)
        stack.push_async_callback(manager.aclose)
        self.metrics.watch(Poller(manager, counters, daemon_mode=cfg.daemon.mode,
                                  cache_limit_bytes=cfg.cache.limit_bytes))
        lazy = LazyLayers(cfg, manager, client)
        stack.push_async_callback(lazy.aclose)
        await lazy.start()
        snapshotter = RemoteSnapshotter(cfg, store, lazy, observe=self.metrics.observe_decision)
        await snapshotter.restore()
        return snapshotter

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
