"""The FUSE daemon process: the mount, the control socket and the layers behind them.

``Daemon.run`` is the process: mount FUSE (``fsname=lazysnap``, ``subtype=lazysnap``,
``ro``, ``default_permissions``, ``allow_other`` unless configured off), widen the mount's
kernel read-ahead window once the kernel's INIT is answered (``read_ahead_kib``), serve the
control socket, add the configured layers, then wait for SIGTERM/SIGINT, a ``shutdown``
request or an external unmount, and tear down: layers first (pending reads fail with EIO and
ready-waiters get "daemon is stopping" rather than hang), then the control socket, the
FUSE loop, the mount, and the registry connections.
"""


from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.daemonapi.enums import DaemonMode
from snapshotter.daemonapi.specs import DaemonSpec
from snapshotter.errdefs import (
    ConfigError,
    DaemonError,
    StartupError,
)
from snapshotter.fs.control import (
    ControlServer,
)
from snapshotter.fs.fuse.kernel import set_read_ahead
from snapshotter.fs.fuse.session import FuseSession, MountOptions
from snapshotter.fs.layers import BlobSource, LayerManager, LayerOpener
from snapshotter.fs.ops import (
    FuseTimeouts,
    LayerOperations,
    NullNotifier,
)
from snapshotter.metrics.counters import DaemonCounters

log = logging.getLogger(__name__)



def mount_options(config: DaemonSpec) -> MountOptions:
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
        config: DaemonSpec,
        *,
        mode: str,
        mountpoint: str,
        control_path: str,
        source: BlobSource,
        control_sock: Any = None,
        openers: Mapping[str, LayerOpener] | None = None,
        counters: DaemonCounters | None = None,
    ) -> None:
        if mode not in tuple(DaemonMode):
            raise ConfigError(f"mode must be one of {[str(m) for m in DaemonMode]}, "
                              f"got {mode!r}")
        self._config = config
        self._mountpoint = mountpoint
        self._source = source
        self._cache = ChunkCache(
            config.cache_dir, config.cache_limit_bytes, fsync=config.cache_fsync
        )
        self._ops = LayerOperations(
            shared=mode == DaemonMode.SHARED,
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
