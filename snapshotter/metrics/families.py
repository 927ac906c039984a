"""Every lazysnap metric: its name, help, type and labels, on an injected registry.

``Metrics(registry)`` is the one collector on ``registry``. It counts what the snapshotter
observes as it happens (gRPC calls, remote decisions) and renders, at scrape time,
everything read when Prometheus asks (the daemon table, each daemon's own counters, the
registry client's, per-layer progress), which ``Poller`` (collector.py) gathers and
``refresh`` stores just before the registry is rendered. Nothing is process-global: two
``Metrics`` on two registries in one process are independent.

Names: prefix ``lazysnap_``; counters end in ``_total``, durations are histograms in
``_seconds``, sizes end in ``_bytes``. The few gauges that have no unit (a number of
daemons, a 0/1 flag) have no suffix: Prometheus's conventions (and ``promtool check
metrics``) forbid ``_total`` on anything but a counter.

Labels are bounded: gRPC method and status code names, remote format and fallback reason
tokens, FUSE operation names, registry request kinds, status classes and error class
names, fetch phases and results, daemon states and modes. The scrape-time collector adds
two unbounded ones, as the architecture allows there: ``daemon`` (one per daemon process)
and, on the ``lazysnap_layer_*`` families, ``snapshot_id`` and ``digest`` (one series per
mounted layer).

Families (type, labels):
  lazysnap_grpc_requests_total                 counter   method, code
  lazysnap_grpc_request_duration_seconds       histogram method
  lazysnap_remote_snapshots_total              counter   format
  lazysnap_remote_fallbacks_total              counter   reason
  lazysnap_daemons                             gauge     state, mode
  lazysnap_daemon_restarts_total               counter
  lazysnap_daemon_reattaches_total             counter
  lazysnap_daemon_up                           gauge     daemon       (answered this scrape)
  lazysnap_daemon_rss_bytes                    gauge     daemon
  lazysnap_fuse_requests_total                 counter   op
  lazysnap_fuse_request_errors_total           counter   op
  lazysnap_fuse_request_duration_seconds       histogram op
  lazysnap_fuse_served_bytes_total             counter
  lazysnap_fuse_passthrough_opens_total        counter
  lazysnap_registry_requests_total             counter   source, kind, status
  lazysnap_registry_received_bytes_total       counter   source
  lazysnap_registry_request_duration_seconds   histogram source
  lazysnap_registry_retries_total              counter   source
  lazysnap_registry_errors_total               counter   source, error
  lazysnap_registry_events_total               counter   source, event
  lazysnap_cache_hits_total                    counter
  lazysnap_cache_misses_total                  counter
  lazysnap_cache_stored_bytes_total            counter
  lazysnap_cache_evictions_total               counter
  lazysnap_cache_size_bytes                    gauge
  lazysnap_cache_limit_bytes                   gauge
  lazysnap_fetch_bytes_total                   counter   phase
  lazysnap_fetch_duration_seconds              histogram phase
  lazysnap_fetch_layers_total                  counter   phase, result
  lazysnap_layer_fetched_bytes                 gauge     snapshot_id, digest
  lazysnap_layer_size_bytes                    gauge     snapshot_id, digest
  lazysnap_layer_fully_fetched                 gauge     snapshot_id, digest
  lazysnap_layer_ready                         gauge     snapshot_id, digest
``source`` is ``snapshotter`` (the serving process's own registry client, which checks
layers) or ``daemons`` (the FUSE daemons' clients, which read the content).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from snapshotter.metastore.daemons import DaemonState
from snapshotter.metrics import counters as c
from snapshotter.metrics.collector import Poller, Readings

GRPC_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_TOKEN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
OTHER = "other"


def bounded(value: str) -> str:
    """``value`` if it is a short token, else ``other``: a label never carries free text."""
    return value if _TOKEN.match(value) else OTHER


class Metrics:
    """The snapshotter's metrics on ``registry``; see the module docstring.

    The observers count into plain counters and histograms that are rendered, like the
    scrape-time figures, when the registry is collected (so no ``_created`` series, whose
    names would follow no rule of ours). Use it on the event loop that serves scrapes.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._calls: Counter[tuple[str, str]] = Counter()
        self._call_latency: dict[str, c.Histogram] = {}
        self._remote: Counter[str] = Counter()
        self._fallbacks: Counter[str] = Counter()
        self._poller: Poller | None = None
        self._readings: Readings | None = None
        registry.register(self)

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        """A ``SnapshotsService`` observer: one answered call."""
        method = bounded(method)
        self._calls[(method, bounded(code))] += 1
        hist = self._call_latency.get(method)
        if hist is None:
            hist = self._call_latency[method] = c.Histogram(GRPC_BUCKETS_S)
        hist.observe(seconds)

    def observe_decision(self, fmt: str, reason: str) -> None:
        """A ``RemoteSnapshotter`` observer: a remote snapshot (``fmt``) or a fallback
        (``reason``); exactly one of them is non-empty."""
        if fmt:
            self._remote[bounded(fmt)] += 1
        else:
            self._fallbacks[bounded(reason or "unknown")] += 1

    def watch(self, poller: Poller) -> None:
        """Render the scrape-time families from what ``poller`` reads on each ``refresh``."""
        self._poller = poller

    async def refresh(self) -> None:
        """Read the scrape-time figures now (call right before rendering the registry;
        until the first refresh only the observed families are rendered).

        Never raises but cancellation (the poller swallows daemon failures)."""
        if self._poller is not None:
            self._readings = await self._poller.poll()

    def collect(self) -> Iterable[Metric]:
        """Every family (prometheus_client's collector protocol)."""
        families = list(self._observed_families())
        r = self._readings
        if r is not None:
            families += [*_daemon_families(r), *_fuse_families(r.daemon_totals.fuse),
                         *_registry_families(r), *_cache_families(r), *_fetch_families(r),
                         *_layer_families(r)]
        return families

    def _observed_families(self) -> Iterator[Metric]:
        calls = _counter("lazysnap_grpc_requests_total",
                         "Snapshots API calls answered, by method and code.", ["method", "code"])
        for (method, code), n in sorted(self._calls.items()):
            calls.add_metric([method, code], n)
        latency = _histogram("lazysnap_grpc_request_duration_seconds",
                             "Snapshots API call latency.", ["method"])
        for method, hist in sorted(self._call_latency.items()):
            _add_histogram(latency, [method], hist)
        remote = _counter("lazysnap_remote_snapshots_total",
                          "Layers mounted lazily as remote snapshots, by format.", ["format"])
        for fmt, n in sorted(self._remote.items()):
            remote.add_metric([fmt], n)
        fallbacks = _counter(
            "lazysnap_remote_fallbacks_total",
            "Layers that could not be mounted lazily and were pulled, by reason.", ["reason"])
        for reason, n in sorted(self._fallbacks.items()):
            fallbacks.add_metric([reason], n)
        yield from (calls, latency, remote, fallbacks)


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _histogram(name: str, doc: str, labels: Sequence[str] = ()) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=list(labels))


def _add_histogram(family: HistogramMetricFamily, labels: Sequence[str],
                   hist: c.Histogram) -> None:
    buckets = [("+Inf" if math.isinf(le) else repr(le), float(n)) for le, n in hist.cumulative()]
    family.add_metric(list(labels), buckets, hist.sum)


def _daemon_families(r: Readings) -> Iterator[Metric]:
    by_state = _gauge("lazysnap_daemons", "FUSE daemons supervised, by state and mode.",
                      ["state", "mode"])
    counts: dict[tuple[str, str], int] = {
        (s.value, r.daemon_mode): 0 for s in DaemonState if s is not DaemonState.STOPPED}
    for d in r.daemons:
        key = (d.record.state.value, bounded(d.record.mode))
        counts[key] = counts.get(key, 0) + 1
    for (state, mode), n in sorted(counts.items()):
        by_state.add_metric([state, mode], n)
    yield by_state
    yield CounterMetricFamily("lazysnap_daemon_restarts_total",
                              "Daemons started again after they died.", r.restarts_total)
    yield CounterMetricFamily(
        "lazysnap_daemon_reattaches_total",
        "Live daemons taken over from a previous lazysnap process.", r.reattached_total)
    up = _gauge("lazysnap_daemon_up", "1 if the daemon answered its status in this scrape.",
                ["daemon"])
    rss = _gauge("lazysnap_daemon_rss_bytes", "Resident set size of each live daemon.",
                 ["daemon"])
    for d in r.daemons:
        up.add_metric([d.record.id], 1 if d.status is not None else 0)
        if d.rss_bytes is not None:
            rss.add_metric([d.record.id], d.rss_bytes)
    yield up
    yield rss


def _fuse_families(fuse: c.FuseStats) -> Iterator[Metric]:
    ops = _counter("lazysnap_fuse_requests_total", "FUSE requests served, by operation.",
                   ["op"])
    errors = _counter("lazysnap_fuse_request_errors_total",
                      "FUSE requests answered with an error, by operation.", ["op"])
    latency = _histogram("lazysnap_fuse_request_duration_seconds",
                         "FUSE request latency, by operation.", ["op"])
    for op in sorted(fuse.ops):
        ops.add_metric([bounded(op)], fuse.ops[op])
        errors.add_metric([bounded(op)], fuse.errors.get(op, 0))
    for op, hist in sorted(fuse.latency.items()):
        _add_histogram(latency, [bounded(op)], hist)
    yield ops
    yield errors
    yield latency
    yield CounterMetricFamily("lazysnap_fuse_served_bytes_total",
                              "Bytes returned to FUSE read requests.", fuse.served_bytes)
    yield CounterMetricFamily(
        "lazysnap_fuse_passthrough_opens_total",
        "Opens answered with FUSE passthrough (the kernel reads the cached file itself).",
        fuse.passthrough_opens)


def _registry_families(r: Readings) -> Iterator[Metric]:
    requests = _counter("lazysnap_registry_requests_total",
                        "Registry HTTP requests, by kind and status class (error: no answer).",
                        ["source", "kind", "status"])
    received = _counter("lazysnap_registry_received_bytes_total",
                        "Body bytes received from registries.", ["source"])
    latency = _histogram("lazysnap_registry_request_duration_seconds",
                         "Registry HTTP request latency, until the response headers.",
                         ["source"])
    retries = _counter("lazysnap_registry_retries_total",
                       "Registry operations tried again.", ["source"])
    errors = _counter("lazysnap_registry_errors_total",
                      "Registry operations that failed, by error class.", ["source", "error"])
    events = _counter("lazysnap_registry_events_total",
                      "Redirects, mirror and multi-range fallbacks, storage URL re-resolves.",
                      ["source", "event"])
    for source, reg in (("snapshotter", r.registry), ("daemons", r.daemon_totals.registry)):
        s = reg.stats
        for (kind, status), n in sorted(s.requests.items()):
            requests.add_metric([source, bounded(kind), bounded(status)], n)
        received.add_metric([source], s.bytes_received)
        _add_histogram(latency, [source], reg.latency)
        retries.add_metric([source], s.retries)
        for error, n in sorted(s.errors.items()):
            errors.add_metric([source, bounded(error)], n)
        for event in c.REGISTRY_EVENTS:
            events.add_metric([source, event], getattr(s, event))
    yield from (requests, received, latency, retries, errors, events)


def _cache_families(r: Readings) -> Iterator[Metric]:
    cache = r.cache_totals
    yield CounterMetricFamily("lazysnap_cache_hits_total", "Chunk cache reads that hit.",
                              cache["hits"])
    yield CounterMetricFamily("lazysnap_cache_misses_total", "Chunk cache reads that missed.",
                              cache["misses"])
    yield CounterMetricFamily("lazysnap_cache_stored_bytes_total",
                              "Bytes written into the chunk cache.", cache["bytes_stored"])
    yield CounterMetricFamily("lazysnap_cache_evictions_total",
                              "Chunks evicted from the chunk cache.", cache["evictions"])
    sizes = [d.status.cache.get("size_bytes", 0) for d in r.daemons if d.status is not None]
    if sizes:  # the daemons share the directory; each estimates its size
        yield GaugeMetricFamily("lazysnap_cache_size_bytes",
                                "Estimated size of the chunk cache directory.", max(sizes))
    yield GaugeMetricFamily("lazysnap_cache_limit_bytes", "Configured chunk cache limit.",
                            r.cache_limit_bytes)


def _fetch_families(r: Readings) -> Iterator[Metric]:
    fetch = r.daemon_totals.fetch
    fetched = _counter("lazysnap_fetch_bytes_total",
                       "Compressed bytes fetched by prefetch, background fetch and directory"
                       " read-ahead.", ["phase"])
    durations = _histogram("lazysnap_fetch_duration_seconds",
                           "How long a layer's prefetch or background fetch, or a directory"
                           " read-ahead, took.", ["phase"])
    layers = _counter(
        "lazysnap_fetch_layers_total",
        "Layers whose prefetch or background fetch finished, and directory read-ahead runs,"
        " by result (skipped: nothing to fetch).", ["phase", "result"])
    for phase in c.FETCH_PHASES:
        fetched.add_metric([phase], fetch.bytes.get(phase, 0))
        hist = fetch.durations.get(phase)
        if hist is not None:
            _add_histogram(durations, [phase], hist)
        for result in c.FETCH_RESULTS:
            layers.add_metric([phase, result], fetch.layers.get((phase, result), 0))
    yield from (fetched, durations, layers)


def _layer_families(r: Readings) -> Iterator[Metric]:
    labels = ["snapshot_id", "digest"]
    fetched = _gauge("lazysnap_layer_fetched_bytes",
                     "Compressed bytes of the layer fetched so far.", labels)
    size = _gauge("lazysnap_layer_size_bytes", "Compressed size of the layer blob.", labels)
    full = _gauge("lazysnap_layer_fully_fetched",
                  "1 once the whole layer is in the cache (background fetch done).", labels)
    ready = _gauge("lazysnap_layer_ready", "1 while the layer is mounted and ready.", labels)
    for d in r.daemons:
        for layer in d.status.layers if d.status is not None else ():
            values = [str(layer.layer_id), layer.digest]
            fetched.add_metric(values, layer.fetched_bytes)
            size.add_metric(values, layer.total_bytes)
            full.add_metric(values, 1 if layer.fully_fetched else 0)
            ready.add_metric(values, 1 if layer.ready else 0)
    yield from (fetched, size, full, ready)
