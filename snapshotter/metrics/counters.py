"""Plain counters and histograms that a lazysnap process keeps, and their JSON form.

A FUSE daemon is not scraped by Prometheus: it answers only on its control socket. So it
keeps its figures in these plain objects (no prometheus_client, no globals: the process's
entry point creates them and passes them down) and puts ``DaemonCounters.to_json()`` in its
``/v1/status`` answer. The snapshotter parses them back (``from_json``), sums them over its
daemons (``add``) and renders them as metric families at scrape time (``families.py``).

Contracts:
  * every counter only grows for the life of the object that holds it;
  * every label-like key is a small fixed token (FUSE operation names, registry request
    kinds and status classes, error class names, fetch results), never a path or digest;
  * ``from_json`` accepts exactly what ``to_json`` writes and raises ValueError for
    anything malformed (a wrong type, a negative count, unequal histogram bounds), so a
    broken or hostile daemon cannot make the collector emit garbage.

Nothing here is thread-safe: each object is used on one event loop.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp

from snapshotter.registry.transport import USER_AGENT, RegistryStats

# Upper bounds, in seconds. FUSE requests are served from memory or the cache in well
# under a millisecond and from the registry in tens of milliseconds or more.
FUSE_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
REGISTRY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
FETCH_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

FETCH_PHASES = ("prefetch", "background", "directory")
FETCH_RESULTS = ("complete", "failed", "skipped")
REGISTRY_EVENTS = ("redirects", "mirror_fallbacks", "multi_range_fallbacks",
                   "redirect_reresolves")


def _count(raw: object, what: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"{what}: expected a non-negative integer, got {raw!r}")
    return raw


def _number(raw: object, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ValueError(f"{what}: expected a finite number, got {raw!r}")
    if raw < 0:
        raise ValueError(f"{what}: expected a non-negative number, got {raw!r}")
    return float(raw)


def _object(raw: object, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: expected a JSON object")
    return raw


def _token(raw: object, what: str) -> str:
    if not isinstance(raw, str) or not raw or len(raw) > 64 or not raw.isprintable():
        raise ValueError(f"{what}: expected a short token, got {raw!r}")
    return raw


def _counter(raw: object, what: str) -> Counter[str]:
    obj = _object(raw, what)
    return Counter({_token(k, what): _count(v, f"{what}.{k}") for k, v in obj.items()})


class Histogram:
    """Observations counted per bucket (``bounds`` are upper bounds; one more bucket for
    +Inf) plus their sum. ``add`` needs the same bounds (ValueError otherwise)."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)) or not all(map(math.isfinite,
                                                                       self.bounds)):
            raise ValueError(f"histogram bounds must be finite and increasing: {self.bounds}")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        """Count one observation (a negative one counts as 0)."""
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # len(bounds): +inf
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, the last bound being +inf."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def add(self, other: Histogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different bounds")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def copy(self) -> Histogram:
        new = Histogram(self.bounds)
        new.add(self)
        return new

    def to_json(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_json(cls, raw: object, what: str = "histogram") -> Histogram:
        obj = _object(raw, what)
        bounds, counts = obj.get("bounds"), obj.get("counts")
        if not isinstance(bounds, list) or not isinstance(counts, list):
            raise ValueError(f"{what}: bounds and counts must be arrays")
        hist = cls(_number(b, f"{what}.bounds") for b in bounds)
        if len(counts) != len(hist.counts):
            raise ValueError(f"{what}: {len(counts)} counts for {len(bounds)} bounds")
        hist.counts = [_count(c, f"{what}.counts") for c in counts]
        hist.sum = _number(obj.get("sum"), f"{what}.sum")
        return hist


def _histograms(raw: object, what: str) -> dict[str, Histogram]:
    return {_token(k, what): Histogram.from_json(v, f"{what}.{k}")
            for k, v in _object(raw, what).items()}


def _add_histograms(into: dict[str, Histogram], other: Mapping[str, Histogram]) -> None:
    for key, hist in other.items():
        if key in into:
            into[key].add(hist)
        else:
            into[key] = hist.copy()


@dataclass
class FuseStats:
    """Per-operation request counts, failures (an error answer included) and latency,
    and the bytes ``read`` answered with; the FUSE session (``fs.fusesession``) reports
    every request here."""

    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=dict)
    served_bytes: int = 0
    passthrough_opens: int = 0

    def observe(self, op: str, seconds: float, failed: bool) -> None:
        self.ops[op] += 1
        if failed:
            self.errors[op] += 1
        hist = self.latency.get(op)
        if hist is None:
            hist = self.latency[op] = Histogram(FUSE_BUCKETS_S)
        hist.observe(seconds)

    def add(self, other: FuseStats) -> None:
        self.ops.update(other.ops)
        self.errors.update(other.errors)
        _add_histograms(self.latency, other.latency)
        self.served_bytes += other.served_bytes
        self.passthrough_opens += other.passthrough_opens

    def to_json(self) -> dict[str, Any]:
        return {"ops": dict(self.ops), "errors": dict(self.errors),
                "latency": {k: v.to_json() for k, v in self.latency.items()},
                "served_bytes": self.served_bytes,
                "passthrough_opens": self.passthrough_opens}

    @classmethod
    def from_json(cls, raw: object) -> FuseStats:
        obj = _object(raw, "fuse")
        return cls(ops=_counter(obj.get("ops", {}), "fuse.ops"),
                   errors=_counter(obj.get("errors", {}), "fuse.errors"),
                   latency=_histograms(obj.get("latency", {}), "fuse.latency"),
                   served_bytes=_count(obj.get("served_bytes", 0), "fuse.served_bytes"),
                   passthrough_opens=_count(obj.get("passthrough_opens", 0),
                                            "fuse.passthrough_opens"))


@dataclass
class FetchTotals:
    """Prefetch, background fetch and directory read-ahead, per phase: compressed bytes
    fetched, runs by result (``complete``, ``failed``, or ``skipped`` when there was
    nothing to fetch) and how long each run took (skipped ones are not timed). Prefetch
    and background fetch run once per layer, a directory read-ahead once per directory
    that triggered it (``snapshotter.fs.read.dirahead``)."""

    bytes: Counter[str] = field(default_factory=Counter)
    layers: Counter[tuple[str, str]] = field(default_factory=Counter)
    durations: dict[str, Histogram] = field(default_factory=dict)

    def record(self, phase: str, complete: bool, fetched_bytes: int,
               seconds: float | None) -> None:
        """Count one layer's finished ``phase`` (one of FETCH_PHASES); ``seconds`` None
        means the phase did not run (skipped)."""
        if phase not in FETCH_PHASES:
            raise ValueError(f"unknown fetch phase {phase!r}")
        self.bytes[phase] += max(0, fetched_bytes)
        if seconds is None:
            self.layers[(phase, "skipped")] += 1
            return
        self.layers[(phase, "complete" if complete else "failed")] += 1
        hist = self.durations.get(phase)
        if hist is None:
            hist = self.durations[phase] = Histogram(FETCH_BUCKETS_S)
        hist.observe(seconds)

    def add(self, other: FetchTotals) -> None:
        self.bytes.update(other.bytes)
        self.layers.update(other.layers)
        _add_histograms(self.durations, other.durations)

    def to_json(self) -> dict[str, Any]:
        return {"bytes": dict(self.bytes),
                "layers": [[p, r, n] for (p, r), n in sorted(self.layers.items())],
                "durations": {k: v.to_json() for k, v in self.durations.items()}}

    @classmethod
    def from_json(cls, raw: object) -> FetchTotals:
        obj = _object(raw, "fetch")
        layers: Counter[tuple[str, str]] = Counter()
        rows = obj.get("layers", [])
        if not isinstance(rows, list):
            raise ValueError("fetch.layers: expected an array")
        for row in rows:
            if not isinstance(row, list) or len(row) != 3:
                raise ValueError("fetch.layers: expected [phase, result, count] rows")
            key = (_token(row[0], "fetch phase"), _token(row[1], "fetch result"))
            layers[key] += _count(row[2], "fetch.layers count")
        return cls(bytes=_counter(obj.get("bytes", {}), "fetch.bytes"), layers=layers,
                   durations=_histograms(obj.get("durations", {}), "fetch.durations"))


@dataclass
class RegistryCounters:
    """A registry client's ``RegistryStats`` plus the latency of its HTTP requests.

    Pass ``stats`` and ``session_factory`` to ``RegistryClient``; the factory's sessions
    time every request (redirected storage requests and token requests included) from
    sending it until its response headers arrive, or until it fails.
    """

    stats: RegistryStats = field(default_factory=RegistryStats)
    latency: Histogram = field(default_factory=lambda: Histogram(REGISTRY_BUCKETS_S))

    def session_factory(self) -> aiohttp.ClientSession:
        """A session like the registry transport's default one, with request timing."""
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._started)
        trace.on_request_end.append(self._ended)
        trace.on_request_exception.append(self._ended)
        return aiohttp.ClientSession(
            auto_decompress=False, headers={"User-Agent": USER_AGENT}, trust_env=False,
            trace_configs=[trace],
        )

    async def _started(self, session: aiohttp.ClientSession, ctx: SimpleNamespace,
                       params: object) -> None:
        ctx.lazysnap_started = time.perf_counter()

    async def _ended(self, session: aiohttp.ClientSession, ctx: SimpleNamespace,
                     params: object) -> None:
        started = getattr(ctx, "lazysnap_started", None)
        if started is not None:
            self.latency.observe(time.perf_counter() - started)

    def add(self, other: RegistryCounters) -> None:
        mine, theirs = self.stats, other.stats
        mine.requests.update(theirs.requests)
        mine.errors.update(theirs.errors)
        mine.bytes_received += theirs.bytes_received
        mine.retries += theirs.retries
        for name in REGISTRY_EVENTS:
            setattr(mine, name, getattr(mine, name) + getattr(theirs, name))
        self.latency.add(other.latency)

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": [[k, c, n] for (k, c), n in sorted(s.requests.items())],
            "errors": dict(s.errors), "bytes_received": s.bytes_received,
            "retries": s.retries, "events": {e: getattr(s, e) for e in REGISTRY_EVENTS},
            "latency": self.latency.to_json(),
        }

    @classmethod
    def from_json(cls, raw: object) -> RegistryCounters:
        obj = _object(raw, "registry")
        stats = RegistryStats(
            errors=_counter(obj.get("errors", {}), "registry.errors"),
            bytes_received=_count(obj.get("bytes_received", 0), "registry.bytes_received"),
            retries=_count(obj.get("retries", 0), "registry.retries"),
        )
        rows = obj.get("requests", [])
        if not isinstance(rows, list):
            raise ValueError("registry.requests: expected an array")
        for row in rows:
            if not isinstance(row, list) or len(row) != 3:
                raise ValueError("registry.requests: expected [kind, class, count] rows")
            key = (_token(row[0], "request kind"), _token(row[1], "status class"))
            stats.requests[key] += _count(row[2], "registry.requests count")
        events = _object(obj.get("events", {}), "registry.events")
        for name in REGISTRY_EVENTS:
            setattr(stats, name, _count(events.get(name, 0), f"registry.events.{name}"))
        latency = (Histogram.from_json(obj["latency"], "registry.latency")
                   if "latency" in obj else Histogram(REGISTRY_BUCKETS_S))
        return cls(stats=stats, latency=latency)


@dataclass
class DaemonCounters:
    """Everything a FUSE daemon counts, as published in its status (``counters``)."""

    fuse: FuseStats = field(default_factory=FuseStats)
    fetch: FetchTotals = field(default_factory=FetchTotals)
    registry: RegistryCounters = field(default_factory=RegistryCounters)

    def add(self, other: DaemonCounters) -> None:
        self.fuse.add(other.fuse)
        self.fetch.add(other.fetch)
        self.registry.add(other.registry)

    def to_json(self) -> dict[str, Any]:
        return {"fuse": self.fuse.to_json(), "fetch": self.fetch.to_json(),
                "registry": self.registry.to_json()}

    @classmethod
    def from_json(cls, raw: object) -> DaemonCounters:
        """Parse a daemon's ``counters``; missing parts are empty. Raises ValueError."""
        obj = _object(raw, "counters")
        return cls(fuse=FuseStats.from_json(obj.get("fuse", {})),
                   fetch=FetchTotals.from_json(obj.get("fetch", {})),
                   registry=RegistryCounters.from_json(obj.get("registry", {})))
