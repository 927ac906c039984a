"""Gathering the scrape-time figures: the daemon table, and each daemon's own counters.

``Poller.poll`` runs once per scrape, on the event loop of ``lazysnap serve``: it lists the
daemons the ``DaemonManager`` supervises, asks every running one for its status over its
control socket, all at once and each within ``timeout`` seconds, reads their resident set
sizes from /proc, and returns ``Readings``, which ``families.py`` renders.

Failure modes: none escape. A daemon that is not running, does not answer in time, or
answers with something that does not parse is reported as unreachable
(``DaemonReading.status`` None) and logged at debug level; the scrape goes on.

Daemon counters are summed over daemons so that the families stay few and their labels
bounded. The sum must never decrease (Prometheus would read a drop as a counter reset and
count the whole value again), yet daemons come and go: ``Lifetimes`` keeps the last
counters read from every daemon process, keyed by (daemon id, pid), and when a process is
no longer in the daemon table (stopped, or restarted under a new pid) adds them to a
retired total. Requests a daemon served after its last scrape are lost with it; an
unreachable daemon contributes its last-read counters until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from daemon_manager.process import is_our_daemon
from snapshotter.daemonapi.client import ControlClient
from snapshotter.daemonapi.status import DaemonStatus
from snapshotter.metastore.daemons import DaemonRecord, DaemonState
from snapshotter.metrics.counters import DaemonCounters, RegistryCounters
from snapshotter.osutil.proc import rss_bytes

log = logging.getLogger(__name__)

DAEMON_STATUS_TIMEOUT_S = 2.0
CACHE_COUNTERS = ("hits", "misses", "bytes_stored", "evictions")

StatusQuery = Callable[[str, float], Awaitable[DaemonStatus]]
"""``query(control socket path, timeout seconds) -> DaemonStatus`` (raises on failure)."""


async def control_status(path: str, timeout: float) -> DaemonStatus:
    """A daemon's status through its control socket (``ControlClient``)."""
    return await ControlClient(path, request_timeout_s=timeout).status()


class DaemonTable(Protocol):
    """What the poller reads from ``daemon_manager.manager.DaemonManager``."""

    restarts_total: int
    reattached_total: int

    def records(self) -> list[DaemonRecord]: ...


@dataclass(frozen=True)
class DaemonReading:
    """One supervised daemon in one scrape: ``rss_bytes`` None when its process is gone,
    ``status`` None when it did not answer (or answered something malformed)."""

    record: DaemonRecord
    rss_bytes: int | None
    status: DaemonStatus | None


@dataclass(frozen=True)
class Readings:
    """Everything the scrape-time families are rendered from."""

    daemon_mode: str
    daemons: Sequence[DaemonReading]
    daemon_totals: DaemonCounters
    cache_totals: Counter[str]
    registry: RegistryCounters
    restarts_total: int
    reattached_total: int
    cache_limit_bytes: int


@dataclass
class _Figures:
    counters: DaemonCounters
    cache: Counter[str]


class Lifetimes:
    """Monotonic sums of daemon counters across daemon processes (see module docstring)."""

    def __init__(self) -> None:
        self._retired = _Figures(DaemonCounters(), Counter())
        self._live: dict[tuple[str, int], _Figures] = {}

    def update(
        self, current: Mapping[tuple[str, int], tuple[DaemonCounters, Counter[str]] | None]
    ) -> tuple[DaemonCounters, Counter[str]]:
        """Record this scrape's readings (None: not read this time) and return the sums.

        ``current`` must name every daemon process still in the table, read or not.
        """
        for key, read in current.items():
            if read is not None:
                self._live[key] = _Figures(*read)
        for key in [k for k in self._live if k not in current]:
            gone = self._live.pop(key)
            self._retired.counters.add(gone.counters)
            self._retired.cache.update(gone.cache)
        counters, cache = DaemonCounters(), Counter(self._retired.cache)
        counters.add(self._retired.counters)
        for figures in self._live.values():
            counters.add(figures.counters)
            cache.update(figures.cache)
        return counters, cache


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}: expected a non-negative integer, got {value!r}")
    return value


def figures_of(status: DaemonStatus) -> tuple[DaemonCounters, Counter[str]]:
    """A status's counters and its chunk-cache counters.

    Raises ValueError when anything the families render from the status is malformed
    (counters, cache figures, the layers' ids, digests, sizes and flags), so that one
    broken daemon cannot make a scrape fail.
    """
    counters = DaemonCounters.from_json(status.counters)
    cache: Counter[str] = Counter()
    for name in CACHE_COUNTERS:
        cache[name] = _count(status.cache.get(name, 0), f"cache.{name}")
    _count(status.cache.get("size_bytes", 0), "cache.size_bytes")
    for layer in status.layers:
        _count(layer.layer_id, "layer_id")
        _count(layer.fetched_bytes, "layer fetched_bytes")
        _count(layer.total_bytes, "layer total_bytes")
        if not isinstance(layer.digest, str) or not all(
                isinstance(flag, bool) for flag in (layer.ready, layer.fully_fetched)):
            raise ValueError(f"layer {layer.layer_id}: malformed digest or flags")
    return counters, cache


class Poller:
    """Produces ``Readings`` for one scrape; see the module docstring.

    ``registry`` is the snapshotter's own registry client's counters; ``query`` asks one
    daemon for its status (tests pass a fake).
    """

    def __init__(
        self,
        daemons: DaemonTable,
        registry: RegistryCounters,
        *,
        daemon_mode: str,
        cache_limit_bytes: int,
        timeout: float = DAEMON_STATUS_TIMEOUT_S,
        query: StatusQuery = control_status,
    ) -> None:
        self.daemons = daemons
        self.registry = registry
        self.daemon_mode = daemon_mode
        self.cache_limit_bytes = cache_limit_bytes
        self.timeout = timeout
        self.query = query
        self.lifetimes = Lifetimes()
        # One poll at a time: an older poll finishing after a newer one would bring back
        # a daemon the newer one retired, and its counters would be summed twice.
        self._lock = asyncio.Lock()

    async def poll(self) -> Readings:
        """Read every supervised daemon concurrently; never raises (but cancellation).

        Concurrent calls are served one after the other."""
        async with self._lock:
            return await self._poll()

    async def _poll(self) -> Readings:
        records = self.daemons.records()
        statuses = await asyncio.gather(*(self._status(r) for r in records))
        readings: list[DaemonReading] = []
        current: dict[tuple[str, int], tuple[DaemonCounters, Counter[str]] | None] = {}
        for rec, status in zip(records, statuses, strict=True):
            figures = None
            if status is not None:
                try:
                    figures = figures_of(status)
                except ValueError as exc:
                    log.debug("daemon %s: unusable counters: %s", rec.id, exc)
                    status = None
            current[(rec.id, rec.pid)] = figures
            alive = is_our_daemon(rec.pid, rec.control)  # a pid may belong to another now
            readings.append(DaemonReading(record=rec, rss_bytes=rss_bytes(rec.pid) if alive
                                          else None, status=status))
        totals, cache = self.lifetimes.update(current)
        return Readings(
            daemon_mode=self.daemon_mode, daemons=readings, daemon_totals=totals,
            cache_totals=cache, registry=self.registry,
            restarts_total=self.daemons.restarts_total,
            reattached_total=self.daemons.reattached_total,
            cache_limit_bytes=self.cache_limit_bytes,
        )

    async def _status(self, rec: DaemonRecord) -> DaemonStatus | None:
        if rec.state is not DaemonState.RUNNING or rec.pid <= 0:
            return None
        try:
            return await asyncio.wait_for(self.query(rec.control, self.timeout), self.timeout)
        except Exception as exc:  # a scrape must survive any daemon, dead or broken
            log.debug("daemon %s: no status: %s: %s", rec.id, type(exc).__name__, exc)
            return None
