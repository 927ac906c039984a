"""``lazysnap status``: the snapshots, the daemons that serve remote ones, and the cache.

It reads ``ROOT/metadata.db`` read-only (tables ``snapshots`` and ``daemons``; safe while
``lazysnap serve`` runs: the database is in WAL mode), asks every daemon's control socket
for its status (all at once, each within ``--timeout`` seconds), sums the chunk cache
directory, and prints three tables, or one JSON object with ``--json``.

A remote snapshot is *down* when no daemon record serves it, when that daemon's record is
not ``running`` (it died, is being restarted, or gave up: ``failed``), when its process is
gone, when its control socket does not answer, or when the daemon does not serve the
layer or reports it failed. Its row says which. A layer still being prepared is not down.

Exit status: 0 when every remote snapshot is served; 1 when at least one is down; 2 for a
bad command line or configuration (``cli.py``); 3 when lazysnap's state cannot be read
(no metastore at ROOT, or it is not a lazysnap metastore).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from daemon_manager.process import is_our_daemon
from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.errdefs import StartupError
from snapshotter.metastore.daemons import DaemonTable
from snapshotter.metastore.store import MetaStore
from snapshotter.osutil.proc import rss_bytes

if TYPE_CHECKING:  # the control client (aiohttp) is imported only when status runs
    from snapshotter.daemonapi.status import DaemonStatus, LayerStatus
    from snapshotter.metrics.collector import StatusQuery

EXIT_OK, EXIT_DOWN, EXIT_UNREADABLE = 0, 1, 3
DEFAULT_TIMEOUT_S = 2.0
RUNNING = "running"


class StateError(Exception):
    """lazysnap's metastore cannot be read (missing, or not a lazysnap database)."""


@dataclass(frozen=True)
class DaemonRow:
    """One daemon: its record, whether its process lives and whether it answered.

    ``health`` is ``running`` or why not: the record's state when that is not running,
    ``dead`` (no such process), ``unreachable`` (its control socket did not answer).
    """

    id: str
    mode: str
    pid: int
    record_state: str
    health: str
    layer_ids: tuple[int, ...]
    rss_bytes: int
    mountpoint: str
    control: str

    @property
    def down(self) -> bool:
        return self.health != RUNNING


@dataclass(frozen=True)
class SnapshotRow:
    """One snapshot; the columns after ``digest`` are empty (None) for local ones.

    ``state`` is ``running``, ``preparing`` (the layer is not ready yet) or why the
    snapshot is down (``down`` is then True): see the module docstring.
    """

    id: int
    key: str
    kind: str
    remote: bool
    digest: str | None
    format: str | None = None
    daemon: str | None = None
    daemon_pid: int | None = None
    state: str | None = None
    fetched_bytes: int | None = None
    total_bytes: int | None = None
    mountpoint: str | None = None
    down: bool = False

    @property
    def percent(self) -> float | None:
        if not self.total_bytes or self.fetched_bytes is None:
            return None
        return 100.0 * self.fetched_bytes / self.total_bytes


@dataclass(frozen=True)
class CacheUsage:
    """The chunk cache directory: bytes and files in it now, the configured limit, and
    the hits and misses of the daemons that answered."""

    dir: str
    size_bytes: int
    files: int
    limit_bytes: int
    hits: int
    misses: int


@dataclass(frozen=True)
class Status:
    root: str
    snapshots: list[SnapshotRow]
    daemons: list[DaemonRow]
    cache: CacheUsage

    @property
    def down(self) -> list[SnapshotRow]:
        return [s for s in self.snapshots if s.remote and s.down]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "healthy": not self.down,
            "snapshots": [{**asdict(s), "percent": s.percent} for s in self.snapshots],
            "daemons": [{**asdict(d), "layer_ids": list(d.layer_ids), "down": d.down}
                        for d in self.daemons],
            "cache": asdict(self.cache),
        }


# --- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _SnapshotRecord:
    id: int
    key: str
    kind: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class _DaemonRecord:
    id: str
    mode: str
    pid: int
    control: str
    mountpoint: str
    state: str
    layer_ids: tuple[int, ...]


def read_metastore(root: str) -> tuple[list[_SnapshotRecord], list[_DaemonRecord]]:
    """Snapshot and daemon records from ``ROOT/metadata.db``, read through the
    metastore's API on a read-only connection (serve may be running); StateError."""
    path = Path(root) / "metadata.db"
    if not path.is_file():
        raise StateError(f"no lazysnap metastore at {path}")
    try:
        store = MetaStore(path, readonly=True)
    except StartupError as exc:
        raise StateError(str(exc)) from None
    try:
        with store.read() as tx:
            snapshots = [_SnapshotRecord(rec.id, rec.key, rec.kind.value, dict(rec.labels))
                         for rec in tx.records()]
        daemons = [_DaemonRecord(rec.id, rec.mode, rec.pid, rec.control, rec.mountpoint,
                                 rec.state.value, _layer_ids(rec.spec))
                   for rec in DaemonTable(store).all()]
    except (sqlite3.Error, ValueError) as exc:
        raise StateError(f"{path} is not a lazysnap metastore: {exc}") from None
    finally:
        store.close()
    return snapshots, daemons


def _layer_ids(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """The layer ids a daemon record's spec names (none if it is not as expected)."""
    try:
        return tuple(int(layer["layer_id"]) for layer in spec.get("layers", []))
    except (ValueError, TypeError, KeyError, AttributeError):
        return ()


async def _query_all(records: Sequence[_DaemonRecord], timeout: float,
                     query: StatusQuery) -> list[DaemonStatus | None]:
    async def one(rec: _DaemonRecord) -> DaemonStatus | None:
        if rec.state != RUNNING or not is_our_daemon(rec.pid, rec.control):
            return None
        try:
            return await asyncio.wait_for(query(rec.control, timeout), timeout)
        except Exception:  # whatever a daemon does, it is just "unreachable" here
            return None

    return list(await asyncio.gather(*(one(r) for r in records)))


def _daemon_row(rec: _DaemonRecord, status: DaemonStatus | None) -> DaemonRow:
    alive = rec.pid > 0 and is_our_daemon(rec.pid, rec.control)
    if rec.state != RUNNING:
        health = rec.state
    elif not alive:
        health = "dead"
    elif status is None:
        health = "unreachable"
    else:
        health = RUNNING
    return DaemonRow(
        id=rec.id, mode=rec.mode, pid=rec.pid, record_state=rec.state, health=health,
        layer_ids=rec.layer_ids, rss_bytes=rss_bytes(rec.pid) if alive else 0,
        mountpoint=rec.mountpoint, control=rec.control,
    )


def _snapshot_row(root: str, rec: _SnapshotRecord, daemon: DaemonRow | None,
                  layer: LayerStatus | None) -> SnapshotRow:
    source = L.layer_source(rec.labels)
    digest = source[1] if source else None
    if not L.is_remote(rec.labels):
        return SnapshotRow(id=rec.id, key=rec.key, kind=rec.kind, remote=False, digest=digest)
    if daemon is None:
        state = "no daemon"
    elif daemon.down:
        state = daemon.health
    elif layer is None:
        state = "layer not served"
    elif layer.error is not None:
        state = f"layer failed: {layer.error}"
    else:
        state = RUNNING if layer.ready else "preparing"
    return SnapshotRow(
        id=rec.id, key=rec.key, kind=rec.kind, remote=True, digest=digest,
        format=rec.labels.get(L.REMOTE_FORMAT) or None,
        daemon=daemon.id if daemon else None, daemon_pid=daemon.pid if daemon else None,
        state=state, fetched_bytes=layer.fetched_bytes if layer else None,
        total_bytes=layer.total_bytes if layer else None,
        mountpoint=str(Path(root) / "snapshots" / str(rec.id) / "fs"),
        down=state not in (RUNNING, "preparing"),
    )


def cache_usage(cache_dir: str, limit_bytes: int,
                statuses: Sequence[DaemonStatus | None]) -> CacheUsage:
    """Sum the regular files under ``cache_dir`` (a missing directory is empty)."""
    size = files = 0
    for dirpath, _, names in os.walk(cache_dir):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                size += st.st_size
                files += 1
    answered = [s for s in statuses if s is not None]
    return CacheUsage(
        dir=cache_dir, size_bytes=size, files=files, limit_bytes=limit_bytes,
        hits=sum(int(s.cache.get("hits", 0)) for s in answered),
        misses=sum(int(s.cache.get("misses", 0)) for s in answered),
    )


async def gather_status(config: Config, timeout: float = DEFAULT_TIMEOUT_S,
                        query: StatusQuery | None = None) -> Status:
    """Everything ``lazysnap status`` shows; raises StateError (see ``read_metastore``).

    ``query`` asks one daemon for its status (default: its control socket)."""
    if query is None:
        from snapshotter.metrics.collector import control_status

        query = control_status
    snapshots, records = read_metastore(config.root)
    statuses = await _query_all(records, timeout, query)
    daemons = [_daemon_row(r, s) for r, s in zip(records, statuses, strict=True)]
    serving: dict[int, tuple[DaemonRow, DaemonStatus | None]] = {}
    for row, status in zip(daemons, statuses, strict=True):
        for sid in row.layer_ids:
            serving[sid] = (row, status)
    rows = []
    for rec in snapshots:
        daemon, status = serving.get(rec.id, (None, None))
        layer = next((x for x in status.layers if x.layer_id == rec.id), None) if status else None
        rows.append(_snapshot_row(config.root, rec, daemon, layer))
    cache = await asyncio.to_thread(cache_usage, config.cache_dir, config.cache.limit_bytes,
                                    statuses)
    return Status(root=config.root, snapshots=rows, daemons=daemons, cache=cache)


# --- rendering ---------------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def short_digest(digest: str | None) -> str:
    if not digest:
        return "-"
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest[:19]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)]


def _snapshot_cells(s: SnapshotRow) -> list[str]:
    if not s.remote:
        return [str(s.id), s.key, s.kind, "local", short_digest(s.digest), "-", "-", "-",
                "-", "-", "-"]
    daemon = f"{s.daemon} ({s.daemon_pid})" if s.daemon else "-"
    state = f"DOWN: {s.state}" if s.down else (s.state or "-")
    fetched = (f"{human_bytes(s.fetched_bytes)}/{human_bytes(s.total_bytes)}"
               if s.total_bytes is not None else "-")
    percent = f"{s.percent:.1f}%" if s.percent is not None else "-"
    return [str(s.id), s.key, s.kind, "remote", short_digest(s.digest), s.format or "-",
            daemon, state, fetched, percent, s.mountpoint or "-"]


def render_text(status: Status) -> str:
    """The three tables and, when something is down, a closing line saying what."""
    lines = ["SNAPSHOTS"]
    lines += _table(["ID", "KEY", "KIND", "TYPE", "DIGEST", "FORMAT", "DAEMON", "STATE",
                     "FETCHED/TOTAL", "%", "MOUNTPOINT"],
                    [_snapshot_cells(s) for s in status.snapshots])
    lines += ["", "DAEMONS"]
    lines += _table(["ID", "MODE", "PID", "STATE", "LAYERS", "RSS", "MOUNTPOINT"],
                    [[d.id, d.mode, str(d.pid), d.health if not d.down else f"DOWN: {d.health}",
                      ",".join(map(str, d.layer_ids)) or "-",
                      human_bytes(d.rss_bytes) if not d.down else "-", d.mountpoint]
                     for d in status.daemons])
    c = status.cache
    used = f"{100.0 * c.size_bytes / c.limit_bytes:.1f}%" if c.limit_bytes else "-"
    lines += ["", "CACHE"]
    lines += _table(["DIR", "SIZE", "FILES", "LIMIT", "USED", "HITS", "MISSES"],
                    [[c.dir, human_bytes(c.size_bytes), str(c.files),
                      human_bytes(c.limit_bytes), used, str(c.hits), str(c.misses)]])
    down = status.down
    if down:
        lines += ["", f"{len(down)} remote snapshot(s) down: "
                  + ", ".join(f"id {s.id} ({s.state})" for s in down)]
    return "\n".join(lines) + "\n"


# --- command -------------------------------------------------------------------------------


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--timeout``; the caller adds the configuration flags."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"how long to wait for each daemon (default {DEFAULT_TIMEOUT_S})")


def run_status(config: Config, *, as_json: bool, timeout: float,
               out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Print the status of the lazysnap at ``config.root`` to ``out`` (default stdout),
    errors to ``err`` (default stderr); return the exit status (module docstring)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        status = asyncio.run(gather_status(config, max(0.1, timeout)))
    except StateError as exc:
        print(f"lazysnap status: {exc}", file=err)
        return EXIT_UNREADABLE
    if as_json:
        json.dump(status.to_json(), out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        out.write(render_text(status))
    return EXIT_DOWN if status.down else EXIT_OK
