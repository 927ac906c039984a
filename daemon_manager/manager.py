"""The daemon manager: one FUSE daemon per remote layer, or one shared daemon for all.

Contract:
  * ``mount(sid, mountpoint, spec)`` returns once the layer is served at ``mountpoint``
    (mounted and prefetched) or raises DaemonError, leaving no process, mount or record.
  * ``unmount(sid)`` stops serving the layer (record deleted first, then teardown).
  * ``check(sid)`` raises Unavailable when the layer's daemon is not running.
  * ``start()`` re-attaches to live daemons recorded by a previous ``lazysnap serve`` and
    starts again the ones that died meanwhile.
  * ``aclose()`` stops supervising; daemons keep running so containers keep their files.
Each daemon is watched through its pidfd; when one exits unexpectedly it is restarted
with exponential backoff (at most ``restart_limit`` times in ``RESTART_WINDOW`` seconds)
and its layers are mounted again at the same places.

Modes (``DaemonSettings.mode``): *dedicated* mounts FUSE directly on the snapshot's ``fs``;
*shared* mounts one FUSE file system at ``<root>/fuse/shared`` whose subdirectory
``<sid>`` is bind-mounted on the snapshot's ``fs``. In shared mode ``start()`` also starts
the shared daemon (in the background) when none is running, so that the first pull does
not wait for a Python process to start; it stops when its last layer is unmounted and is
started again by the next mount.

The manager depends on the daemon contract (``snapshotter.daemonapi``: specs, settings,
the typed control client) and on the metastore, not on the daemon's internals or on the
configuration as a whole: ``DaemonSettings`` carries what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from daemon_manager import process
from daemon_manager.zygote import ZygoteClient
from snapshotter.daemonapi.client import ControlClient
from snapshotter.daemonapi.enums import DaemonMode
from snapshotter.daemonapi.reasons import LayerFailed
from snapshotter.daemonapi.specs import DaemonSettings, LayerSpec
from snapshotter.daemonapi.status import DaemonStatus, LayerStatus
from snapshotter.errdefs import DaemonError, LazysnapError, Unavailable
from snapshotter.metastore.daemons import DaemonRecord, DaemonState, DaemonTable
from snapshotter.metastore.store import MetaStore
from snapshotter.osutil.files import write_json_atomically
from snapshotter.osutil.mountutil import MNT_DETACH, MS_BIND, mount, unmount

log = logging.getLogger(__name__)
RESTART_WINDOW = 600.0
SHARED_ID = "shared"


class DaemonControl(Protocol):
    """The control-socket client the manager needs (``daemonapi.client.ControlClient``)."""

    async def status(self) -> DaemonStatus: ...
    async def add_layer(self, spec: LayerSpec) -> LayerStatus: ...
    async def remove_layer(self, layer_id: int) -> None: ...
    async def wait_ready(self, layer_id: int, timeout: float) -> LayerStatus: ...
    async def shutdown(self) -> None: ...
    async def aclose(self) -> None: ...


ControlFactory = Callable[[str], DaemonControl]


def _default_control(path: str) -> DaemonControl:
    return ControlClient(path)


@dataclass
class _Live:
    """A supervised daemon: its record, watch task and the layers it serves."""

    rec: DaemonRecord
    task: asyncio.Task[None] | None = None
    layers: dict[int, LayerSpec] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)
    stopping: bool = False


class DaemonManager:
    """Spawns, supervises and restarts FUSE daemons. See the module docstring."""

    def __init__(
        self,
        settings: DaemonSettings,
        store: MetaStore,
        control_factory: ControlFactory = _default_control,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.table = DaemonTable(store)
        self.control_factory = control_factory
        self.clock = clock
        self.root = settings.root
        self.run_dir = self.root / "daemons"
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.live: dict[str, _Live] = {}
        self.mountpoints: dict[int, str] = {}
        self.lock = asyncio.Lock()
        self._prestart: asyncio.Task[None] | None = None
        self._zygote: ZygoteClient | None = None
        self._zygote_pid = 0
        self.restarts_total = 0
        self.reattached_total = 0

    @property
    def mode(self) -> DaemonMode:
        return self.settings.mode

    # --- public API -------------------------------------------------------------------------

    async def mount(self, sid: int, mountpoint: str, spec: LayerSpec) -> None:
        async with self.lock:
            if self.mode is DaemonMode.SHARED:
                await self._mount_shared(sid, mountpoint, spec)
            else:
                await self._mount_dedicated(sid, mountpoint, spec)

    async def unmount(self, sid: int) -> None:
        async with self.lock:
            mountpoint = self.mountpoints.pop(sid, None)
            did = f"layer-{sid}"
            if did in self.live or self.table.get(did) is not None:
                await self._stop(did)
            shared = self.live.get(SHARED_ID)
            if shared is not None and sid in shared.layers:
                del shared.layers[sid]
                self._persist(shared, shared.rec.state)
                if mountpoint:
                    _lazy_unmount(mountpoint)
                if not shared.layers:
                    # Nothing left to serve: an idle shared daemon would be a leak.
                    await self._stop(SHARED_ID)
                    return
                with contextlib.suppress(LazysnapError, OSError):
                    async with self._control(shared.rec) as control:
                        await control.remove_layer(sid)

    def check(self, sid: int) -> None:
        live = self.live.get(f"layer-{sid}") or self.live.get(SHARED_ID)
        if live is None or (live.rec.id == SHARED_ID and sid not in live.layers):
            raise Unavailable(f"no daemon serves remote snapshot {sid}")
        if live.rec.state is not DaemonState.RUNNING:
            raise Unavailable(
                f"the daemon of remote snapshot {sid} is {live.rec.state.value}")

    def records(self) -> list[DaemonRecord]:
        return [lv.rec for lv in self.live.values()]

    async def start(self, wanted: dict[int, tuple[str, LayerSpec]]) -> None:
        """Re-attach or restart daemons for the remote snapshots in ``wanted``.

        ``wanted`` maps snapshot id -> (mountpoint, spec) for every remote snapshot in
        the metastore. Daemon records for snapshots no longer wanted are torn down.
        """
        for rec in self.table.all():
            sids = [int(layer["layer_id"]) for layer in rec.spec.get("layers", [])
                    if isinstance(layer, dict) and isinstance(layer.get("layer_id"), int)]
            keep = {s for s in sids if s in wanted}
            if keep and await self._reattach(rec, keep, wanted):
                continue
            await self._teardown(rec)
        for sid, (mountpoint, spec) in sorted(wanted.items()):
            if sid not in self.mountpoints:
                try:
                    await self.mount(sid, mountpoint, spec)
                except DaemonError as e:
                    log.error("cannot restore remote snapshot %d: %s", sid, e)
        if self.mode is DaemonMode.SHARED and SHARED_ID not in self.live:
            self._prestart = asyncio.create_task(self._prestart_shared(), name="prestart")
        if self.mode is DaemonMode.DEDICATED and self.settings.zygote and self._zygote is None:
            self._start_zygote()

    async def _prestart_shared(self) -> None:
        """Start the shared daemon with no layers unless a mount got there first."""
        async with self.lock:
            if SHARED_ID in self.live:
                return
            try:
                await self._launch(self._shared_live())
            except (DaemonError, OSError) as e:  # the first mount will try again
                log.warning("could not start the shared daemon ahead of use: %s", e)

    async def aclose(self) -> None:
        """Stop watching daemons; leave them running (the zygote is stopped)."""
        self._stop_zygote()
        if self._prestart is not None:
            self._prestart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prestart
        for live in self.live.values():
            if live.task is not None:
                live.task.cancel()
        for live in self.live.values():
            if live.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await live.task
        self.live.clear()

    # --- dedicated mode -------------------------------------------------------------------

    async def _mount_dedicated(self, sid: int, mountpoint: str, spec: LayerSpec) -> None:
        did = f"layer-{sid}"
        rec = DaemonRecord(
            id=did, mode=DaemonMode.DEDICATED.value, control=str(self.run_dir / f"{did}.sock"),
            mountpoint=mountpoint, spec={"layers": [spec.to_json()]},
        )
        live = _Live(rec=rec, layers={sid: spec})
        await self._launch(live)
        self.mountpoints[sid] = mountpoint

    # --- shared mode ----------------------------------------------------------------------

    async def _mount_shared(self, sid: int, mountpoint: str, spec: LayerSpec) -> None:
        live = self.live.get(SHARED_ID)
        if live is None:
            live = self._shared_live()
            await self._launch(live)
        try:
            await self._add_shared_layer(live, sid, spec)
            mount(str(Path(live.rec.mountpoint) / str(sid)), mountpoint, "", MS_BIND)
        except (LazysnapError, OSError) as e:
            live.layers.pop(sid, None)
            self._persist(live, live.rec.state)
            with contextlib.suppress(LazysnapError, OSError):
                async with self._control(live.rec) as control:
                    await control.remove_layer(sid)
            if isinstance(e, LayerFailed):
                raise
            raise DaemonError(f"shared daemon cannot serve snapshot {sid}: {e}") from e
        self.mountpoints[sid] = mountpoint

    def _shared_live(self) -> _Live:
        """A new, not yet started shared daemon with no layers."""
        shared_mnt = self.root / "fuse" / SHARED_ID
        shared_mnt.mkdir(parents=True, exist_ok=True)
        rec = DaemonRecord(
            id=SHARED_ID, mode=DaemonMode.SHARED.value, control=str(self.run_dir / "shared.sock"),
            mountpoint=str(shared_mnt), spec={"layers": []},
        )
        return _Live(rec=rec)

    async def _add_shared_layer(self, live: _Live, sid: int, spec: LayerSpec) -> None:
        live.layers[sid] = spec
        self._persist(live, live.rec.state)
        async with self._control(live.rec) as control:
            await control.add_layer(spec)
            await control.wait_ready(sid, self.settings.ready_timeout)

    # --- launching and supervision --------------------------------------------------------

    def _argv(self, rec: DaemonRecord, layers: tuple[LayerSpec, ...]) -> list[str]:
        conf_path = self.run_dir / f"{rec.id}.json"
        spec = dataclasses.replace(self.settings.template, layers=layers)
        write_json_atomically(conf_path, spec.to_json())
        return [
            sys.executable, "-m", "snapshotter.fs", "--mode", rec.mode,
            "--mountpoint", rec.mountpoint, "--control", rec.control,
            "--control-fd", str(process.CONTROL_FD), "--config", str(conf_path),
        ]

    async def _launch(self, live: _Live) -> None:
        """Start the daemon of ``live``, wait until ready, and supervise it."""
        watch = await self._start_process(live)
        self.live[live.rec.id] = live
        live.task = asyncio.create_task(self._supervise(live, watch), name=f"watch-{live.rec.id}")

    async def _start_process(self, live: _Live) -> process.ProcessWatch:
        """Spawn the daemon of ``live`` and wait until all its layers are ready.

        On failure nothing is left: the process is killed, its mount and record removed.
        """
        rec = live.rec.with_(spec={"layers": [s.to_json() for s in live.layers.values()]})
        live.rec = rec
        self._persist(live, DaemonState.STARTING)
        Path(rec.mountpoint).mkdir(parents=True, exist_ok=True)
        sock = process.listen_unix(rec.control)
        try:
            argv = self._argv(rec, tuple(live.layers.values()))
            pid = await self._spawn(argv, str(self.run_dir / f"{rec.id}.log"), sock)
        finally:
            sock.close()
        live.rec = live.rec.with_(pid=pid)
        self._persist(live, DaemonState.STARTING)
        watch = process.ProcessWatch(pid)
        try:
            await self._wait_ready(live, watch)
        except BaseException:
            watch.close()
            process.kill_session(pid)
            _lazy_unmount(rec.mountpoint)
            self.table.delete(rec.id)
            raise
        self._persist(live, DaemonState.RUNNING)
        return watch

    async def _spawn(self, argv: list[str], log_path: str, sock: socket.socket) -> int:
        """Fork the daemon from the zygote when there is one, else spawn it."""
        zygote = self._zygote
        if zygote is not None:
            try:
                return await asyncio.to_thread(zygote.spawn, argv, log_path, sock)
            except DaemonError as e:
                log.warning("%s; starting daemons without the zygote from now on", e)
                self._stop_zygote()
        return process.spawn(argv, log_path, sock)

    def _start_zygote(self) -> None:
        """Start the zygote (dedicated mode; see ``daemon_manager.zygote``). Its socket is
        listening before it runs, so the first fork request just waits for its imports."""
        path = str(self.run_dir / "zygote.sock")
        try:
            sock = process.listen_unix(path)
            try:
                self._zygote_pid = process.spawn(
                    [sys.executable, "-m", "daemon_manager.zygote"],
                    str(self.run_dir / "zygote.log"), sock)
            finally:
                sock.close()
        except (DaemonError, OSError) as e:
            log.warning("no zygote (%s): every daemon starts a Python process", e)
            return
        self._zygote = ZygoteClient(path)

    def _stop_zygote(self) -> None:
        self._zygote = None
        if self._zygote_pid:
            process.kill_session(self._zygote_pid, signal.SIGTERM)
            process.reap(self._zygote_pid)
            self._zygote_pid = 0

    async def _wait_ready(self, live: _Live, watch: process.ProcessWatch) -> None:
        timeout = self.settings.ready_timeout
        ready = asyncio.ensure_future(self._all_ready(live, timeout))
        died = asyncio.ensure_future(watch.exited())
        try:
            done, _ = await asyncio.wait({ready, died}, timeout=timeout + 5,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (ready, died):
                if not fut.done():
                    fut.cancel()
        if ready in done:
            ready.result()
            return
        tail = log_tail(self.run_dir / f"{live.rec.id}.log")
        if died in done:
            raise DaemonError(f"daemon {live.rec.id} exited during start-up: {tail}")
        raise DaemonError(f"daemon {live.rec.id} not ready after {timeout:.0f}s: {tail}")

    async def _all_ready(self, live: _Live, timeout: float) -> None:
        async with self._control(live.rec) as control:
            for sid in live.layers:
                await control.wait_ready(sid, timeout)

    async def _supervise(self, live: _Live, watch: process.ProcessWatch) -> None:
        while True:
            await watch.exited()
            watch.close()
            if live.stopping:
                return
            log.warning("daemon %s (pid %d) exited; restarting", live.rec.id, live.rec.pid)
            self._persist(live, DaemonState.DIED)
            new_watch = await self._restart(live)
            if new_watch is None:
                return
            watch = new_watch

    async def _restart(self, live: _Live) -> process.ProcessWatch | None:
        now = self.clock()
        live.restarts = [t for t in live.restarts if now - t < RESTART_WINDOW]
        cfg = self.settings
        while len(live.restarts) < cfg.restart_limit:
            delay = min(cfg.restart_backoff * (2 ** len(live.restarts)), cfg.restart_backoff_max)
            live.restarts.append(now)
            await asyncio.sleep(delay)
            self._unmount_all_of(live)
            try:
                async with self.lock:
                    watch = await self._start_process(live)
                    self._rebind_shared(live)
            except (LazysnapError, OSError) as e:
                log.error("restart of daemon %s failed: %s", live.rec.id, e)
                continue
            self.restarts_total += 1
            return watch
        log.error("daemon %s died %d times; giving up", live.rec.id, len(live.restarts))
        self._persist(live, DaemonState.FAILED)
        return None

    def _rebind_shared(self, live: _Live) -> None:
        if live.rec.id != SHARED_ID:
            return
        for sid in live.layers:
            target = self.mountpoints.get(sid)
            if target:
                mount(str(Path(live.rec.mountpoint) / str(sid)), target, "", MS_BIND)

    def _unmount_all_of(self, live: _Live) -> None:
        if live.rec.id == SHARED_ID:
            for sid in live.layers:
                target = self.mountpoints.get(sid)
                if target:
                    _lazy_unmount(target)
        _lazy_unmount(live.rec.mountpoint)

    async def _stop(self, did: str) -> None:
        live = self.live.pop(did, None)
        rec = live.rec if live is not None else self.table.get(did)
        if rec is None:
            return
        if live is not None:
            live.stopping = True
        self.table.delete(did)
        await self._teardown(rec)
        if live is not None and live.task is not None:
            live.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.task

    async def _teardown(self, rec: DaemonRecord) -> None:
        """Stop ``rec``'s process and unmount it; the record is deleted."""
        self.table.delete(rec.id)
        if process.is_our_daemon(rec.pid, rec.control):
            with contextlib.suppress(LazysnapError, OSError, TimeoutError):
                async with self._control(rec) as control:
                    await asyncio.wait_for(control.shutdown(), 5)
            watch = process.ProcessWatch(rec.pid)
            try:
                await asyncio.wait_for(watch.exited(), 5)
            except TimeoutError:
                process.kill_session(rec.pid)
            finally:
                watch.close()
        _lazy_unmount(rec.mountpoint)
        for suffix in (".sock", ".json"):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / f"{rec.id}{suffix}").unlink()

    async def _reattach(
        self, rec: DaemonRecord, keep: set[int], wanted: dict[int, tuple[str, LayerSpec]]
    ) -> bool:
        if rec.state is not DaemonState.RUNNING or not process.is_our_daemon(rec.pid, rec.control):
            return False
        try:
            async with self._control(rec) as control:
                await asyncio.wait_for(control.status(), 5)
        except (LazysnapError, OSError, TimeoutError):
            return False
        live = _Live(rec=rec, layers={s: wanted[s][1] for s in keep})
        for sid in keep:
            self.mountpoints[sid] = wanted[sid][0]
        self.live[rec.id] = live
        live.task = asyncio.create_task(
            self._supervise(live, process.ProcessWatch(rec.pid)), name=f"watch-{rec.id}")
        self.reattached_total += 1
        log.info("re-attached to daemon %s (pid %d)", rec.id, rec.pid)
        return True

    # --- helpers --------------------------------------------------------------------------

    def _persist(self, live: _Live, state: DaemonState) -> None:
        live.rec = live.rec.with_(
            state=state, spec={"layers": [spec.to_json() for spec in live.layers.values()]},
            updated_ns=time.time_ns())
        self.table.put(live.rec)

    @contextlib.asynccontextmanager
    async def _control(self, rec: DaemonRecord) -> AsyncIterator[DaemonControl]:
        """A client of ``rec``'s control socket, closed after use."""
        client = self.control_factory(rec.control)
        try:
            yield client
        finally:
            await client.aclose()


def _lazy_unmount(path: str) -> None:
    with contextlib.suppress(OSError):
        unmount(path, MNT_DETACH)


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
