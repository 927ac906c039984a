"""Metric families, the scrape-time poller and the /metrics endpoint (snapshotter/metrics).

The daemons here are fakes answering a status (or failing to); ``test_metrics_daemon``
covers a real LayerManager behind a real control socket.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from snapshotter.daemonapi.status import DaemonStatus, LayerStatus
from snapshotter.errdefs import DaemonError, StartupError
from snapshotter.metastore.daemons import DaemonRecord, DaemonState
from snapshotter.metrics import families
from snapshotter.metrics.collector import Poller, StatusQuery
from snapshotter.metrics.counters import DaemonCounters, RegistryCounters
from snapshotter.metrics.endpoint import MetricsEndpoint, parse_address
from snapshotter.metrics.families import Metrics, bounded

DIGEST = "sha256:" + "ab" * 32
UNITLESS_GAUGES = {"lazysnap_daemons", "lazysnap_daemon_up", "lazysnap_layer_fully_fetched",
                   "lazysnap_layer_ready"}


@dataclass
class FakeTable:
    """Stands in for DaemonManager."""

    recs: list[DaemonRecord] = field(default_factory=list)
    restarts_total: int = 0
    reattached_total: int = 0

    def records(self) -> list[DaemonRecord]:
        return list(self.recs)


def record(did: str, state: DaemonState = DaemonState.RUNNING, pid: int | None = None,
           mode: str = "dedicated") -> DaemonRecord:
    return DaemonRecord(id=did, mode=mode, control=f"/nonexistent/{did}.sock",
                        mountpoint=f"/mnt/{did}", state=state,
                        pid=os.getpid() if pid is None else pid)


def counters(reads: int = 0, served: int = 0, fetched: int = 0) -> DaemonCounters:
    c = DaemonCounters()
    for _ in range(reads):
        c.fuse.observe("read", 0.001, failed=False)
    c.fuse.observe("lookup", 0.0002, failed=True)
    c.fuse.served_bytes = served
    c.fetch.record("prefetch", True, fetched, 0.3)
    c.registry.stats.count_request("blob_range", 206)
    c.registry.stats.bytes_received = fetched
    c.registry.latency.observe(0.01)
    return c


def status(layer_id: int, c: DaemonCounters, *, hits: int = 1) -> DaemonStatus:
    layer = LayerStatus(layer_id=layer_id, digest=DIGEST, ready=True, error=None,
                        fetched_bytes=300, total_bytes=1200, fully_fetched=False,
                        prefetch_done=True)
    return DaemonStatus(state="running", pid=os.getpid(), mode="dedicated", mountpoint="/m",
                        layers=[layer], counters=c.to_json(),
                        cache={"hits": hits, "misses": 2, "bytes_stored": 10, "evictions": 0,
                               "size_bytes": 4096, "limit_bytes": 1 << 20})


Answer = DaemonStatus | BaseException | None  # None: hang until cancelled


def fake_query(answers: dict[str, Answer]) -> StatusQuery:
    async def query(path: str, timeout: float) -> DaemonStatus:
        answer = answers[path]
        if answer is None:
            await asyncio.Event().wait()
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, DaemonStatus)
        return answer

    return query


def setup(table: FakeTable, answers: dict[str, Answer]) -> tuple[Metrics, Poller]:
    metrics = Metrics(CollectorRegistry())
    poller = Poller(table, RegistryCounters(), daemon_mode="dedicated",
                    cache_limit_bytes=1 << 30, timeout=0.05,
                    query=fake_query(answers))
    metrics.watch(poller)
    return metrics, poller


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_two_metrics_objects_do_not_share_state() -> None:
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.observe_call("Prepare", "OK", 0.01)
    a.observe_decision("estargz", "")
    b.observe_decision("", "not_estargz")
    assert value(a, "lazysnap_grpc_requests_total", method="Prepare", code="OK") == 1
    assert value(b, "lazysnap_grpc_requests_total", method="Prepare", code="OK") is None
    assert value(a, "lazysnap_remote_snapshots_total", format="estargz") == 1
    assert value(b, "lazysnap_remote_fallbacks_total", reason="not_estargz") == 1
    assert value(a, "lazysnap_remote_fallbacks_total", reason="not_estargz") is None
    assert value(a, "lazysnap_grpc_request_duration_seconds_count", method="Prepare") == 1


def test_labels_never_carry_free_text() -> None:
    assert bounded("not_estargz") == "not_estargz"
    assert bounded("a reason with spaces") == bounded("x" * 65) == bounded("") == "other"
    m = Metrics(CollectorRegistry())
    m.observe_decision("", "")
    assert value(m, "lazysnap_remote_fallbacks_total", reason="unknown") == 1


async def test_scrape_renders_daemons_layers_and_summed_counters() -> None:
    table = FakeTable([record("layer-1"), record("layer-2"), record("layer-3"),
                       record("layer-4", DaemonState.FAILED)], restarts_total=2)
    answers: dict[str, Answer] = {
        "/nonexistent/layer-1.sock": status(1, counters(reads=3, served=30, fetched=100)),
        "/nonexistent/layer-2.sock": DaemonError("connection refused"),
        "/nonexistent/layer-3.sock": None,  # hangs: the poller's timeout ends it
    }
    metrics, _ = setup(table, answers)
    await metrics.refresh()
    assert value(metrics, "lazysnap_daemons", state="running", mode="dedicated") == 3
    assert value(metrics, "lazysnap_daemons", state="failed", mode="dedicated") == 1
    assert value(metrics, "lazysnap_daemons", state="died", mode="dedicated") == 0
    assert value(metrics, "lazysnap_daemon_restarts_total") == 2
    assert value(metrics, "lazysnap_daemon_up", daemon="layer-1") == 1
    for down in ("layer-2", "layer-3", "layer-4"):
        assert value(metrics, "lazysnap_daemon_up", daemon=down) == 0
    # The recorded pid (this test) is not a daemon of that socket: no RSS is made up for it.
    assert value(metrics, "lazysnap_daemon_rss_bytes", daemon="layer-1") is None
    assert value(metrics, "lazysnap_fuse_requests_total", op="read") == 3
    assert value(metrics, "lazysnap_fuse_request_errors_total", op="lookup") == 1
    assert value(metrics, "lazysnap_fuse_request_duration_seconds_count", op="read") == 3
    assert value(metrics, "lazysnap_fuse_served_bytes_total") == 30
    assert value(metrics, "lazysnap_registry_received_bytes_total", source="daemons") == 100
    assert value(metrics, "lazysnap_registry_received_bytes_total", source="snapshotter") == 0
    assert value(metrics, "lazysnap_registry_requests_total", source="daemons",
                 kind="blob_range", status="2xx") == 1
    assert value(metrics, "lazysnap_fetch_layers_total", phase="prefetch",
                 result="complete") == 1
    assert value(metrics, "lazysnap_fetch_bytes_total", phase="prefetch") == 100
    assert value(metrics, "lazysnap_cache_hits_total") == 1
    assert value(metrics, "lazysnap_cache_size_bytes") == 4096
    assert value(metrics, "lazysnap_cache_limit_bytes") == 1 << 30
    layer = {"snapshot_id": "1", "digest": DIGEST}
    assert value(metrics, "lazysnap_layer_fetched_bytes", **layer) == 300
    assert value(metrics, "lazysnap_layer_size_bytes", **layer) == 1200
    assert value(metrics, "lazysnap_layer_fully_fetched", **layer) == 0
    assert value(metrics, "lazysnap_layer_ready", **layer) == 1


async def test_totals_never_drop_when_daemons_go_away_or_restart() -> None:
    table = FakeTable([record("layer-1", pid=os.getpid()), record("layer-2")])
    answers: dict[str, Answer] = {
        "/nonexistent/layer-1.sock": status(1, counters(reads=5)),
        "/nonexistent/layer-2.sock": status(2, counters(reads=7)),
    }
    metrics, _ = setup(table, answers)
    await metrics.refresh()
    assert value(metrics, "lazysnap_fuse_requests_total", op="read") == 12
    answers["/nonexistent/layer-2.sock"] = DaemonError("down for a moment")
    await metrics.refresh()  # unreachable but recorded: its last counters still count
    assert value(metrics, "lazysnap_fuse_requests_total", op="read") == 12
    assert value(metrics, "lazysnap_cache_hits_total") == 2
    table.recs = [record("layer-1", pid=1)]  # layer-2 stopped; layer-1 restarted (new pid)
    answers["/nonexistent/layer-1.sock"] = status(1, counters(reads=1))
    await metrics.refresh()
    assert value(metrics, "lazysnap_fuse_requests_total", op="read") == 13
    assert value(metrics, "lazysnap_cache_hits_total") == 3
    assert value(metrics, "lazysnap_daemon_up", daemon="layer-2") is None


async def test_overlapping_scrapes_count_a_stopped_daemon_once() -> None:
    table = FakeTable([record("layer-1")])
    gate = asyncio.Event()
    first = True

    async def query(path: str, timeout: float) -> DaemonStatus:
        nonlocal first
        if not first:
            await gate.wait()
        first = False
        return status(1, counters(reads=5))

    metrics = Metrics(CollectorRegistry())
    metrics.watch(Poller(table, RegistryCounters(), daemon_mode="dedicated",
                         cache_limit_bytes=1, timeout=30, query=query))
    await metrics.refresh()
    older = asyncio.ensure_future(metrics.refresh())  # reads layer-1, then waits on it
    await asyncio.sleep(0)
    table.recs = []  # layer-1 stops while that scrape is under way
    newer = asyncio.ensure_future(metrics.refresh())
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(older, newer)
    await metrics.refresh()
    assert value(metrics, "lazysnap_fuse_requests_total", op="read") == 5


@pytest.mark.parametrize(("part", "garbage"), [
    ("counters", {"fuse": {"ops": {"read": "many"}}}),
    ("cache", {"hits": -1}),
    ("cache", {"size_bytes": "big"}),
    ("layers", [{"fetched_bytes": "x"}]),
    ("layers", [{"ready": "yes"}]),
    ("layers", [{"digest": None}]),
])
async def test_a_daemon_answering_garbage_is_unreachable_not_fatal(
    part: str, garbage: object,
) -> None:
    raw = status(1, counters(reads=1)).to_json()
    if part == "layers":
        assert isinstance(garbage, list)
        raw["layers"] = [{**raw["layers"][0], **garbage[0]}]
    else:
        raw[part] = garbage
    table = FakeTable([record("layer-1"), record("layer-2")])
    metrics, _ = setup(table, {"/nonexistent/layer-1.sock": DaemonStatus.from_json(raw),
                               "/nonexistent/layer-2.sock": status(2, counters(reads=4))})
    await metrics.refresh()
    assert value(metrics, "lazysnap_daemon_up", daemon="layer-1") == 0
    assert value(metrics, "lazysnap_fuse_requests_total", op="read") == 4
    assert b"lazysnap_layer_ready" in generate_latest(metrics.registry)


def test_families_follow_the_naming_rules_and_the_documented_list() -> None:
    metrics = asyncio.run(_populated())
    documented = set(re.findall(r"^  (lazysnap_\w+)\s", families.__doc__ or "", re.M))
    exposed: set[str] = set()
    for family in metrics.registry.collect():
        name = family.name
        assert name.startswith("lazysnap_"), name
        if family.type == "counter":
            exposed.add(name + "_total")
        elif family.type == "histogram":
            assert name.endswith("_seconds"), name
            exposed.add(name)
        else:
            assert family.type == "gauge", (name, family.type)
            assert name.endswith("_bytes") or name in UNITLESS_GAUGES, name
            exposed.add(name)
    assert exposed == documented


async def _populated() -> Metrics:
    table = FakeTable([record("layer-1"), record("layer-2", DaemonState.DIED)])
    metrics, _ = setup(table, {"/nonexistent/layer-1.sock": status(1, counters(4, 40, 99))})
    metrics.observe_call("Prepare", "ALREADY_EXISTS", 0.2)
    metrics.observe_call("Stat", "OK", 0.001)
    metrics.observe_decision("estargz", "")
    metrics.observe_decision("", "not_estargz")
    await metrics.refresh()
    return metrics


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: install the Debian package 'prometheus'"
                    " (scripts/install-deps.sh does)")
    text = generate_latest(asyncio.run(_populated()).registry)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert b"lazysnap_layer_fetched_bytes{" in text


# --- the endpoint ----------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:9610", ("127.0.0.1", 9610)),
    (":9610", ("", 9610)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:1", ("localhost", 1)),
])
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9610", "host:", "host:port", "::1:9610", "[nope]:1",
                                     "h:70000"])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(StartupError, match=r"metrics\.address"):
        parse_address(address)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[MetricsEndpoint, FakeTable]]:
    table = FakeTable([record("layer-1"), record("layer-2")])
    answers: dict[str, Answer] = {"/nonexistent/layer-1.sock": status(1, counters(reads=2)),
                                  "/nonexistent/layer-2.sock": None}
    metrics, _ = setup(table, answers)
    ep = MetricsEndpoint(metrics, "127.0.0.1:0")
    await ep.start()
    try:
        yield ep, table
    finally:
        await ep.aclose()
        await ep.aclose()  # idempotent


async def _get(ep: MetricsEndpoint, accept: str | None = None) -> tuple[int, str, str]:
    host, port = ep.addresses[0]
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://{host}:{port}/metrics", headers=headers) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.text()


async def test_endpoint_serves_fresh_readings_despite_a_hung_daemon(
    endpoint: tuple[MetricsEndpoint, FakeTable],
) -> None:
    ep, table = endpoint
    code, ctype, body = await _get(ep)
    assert code == 200 and ctype.startswith("text/plain")
    assert 'lazysnap_fuse_requests_total{op="read"} 2.0' in body
    assert 'lazysnap_daemon_up{daemon="layer-2"} 0.0' in body
    table.recs.append(record("layer-3", DaemonState.STARTING))
    _, _, body = await _get(ep)
    assert 'lazysnap_daemons{mode="dedicated",state="starting"} 1.0' in body


async def test_endpoint_speaks_openmetrics_when_asked(
    endpoint: tuple[MetricsEndpoint, FakeTable],
) -> None:
    code, ctype, body = await _get(endpoint[0], "application/openmetrics-text; version=1.0.0")
    assert code == 200 and ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


async def test_a_taken_port_is_a_startup_error(
    endpoint: tuple[MetricsEndpoint, FakeTable],
) -> None:
    host, port = endpoint[0].addresses[0]
    other = MetricsEndpoint(Metrics(CollectorRegistry()), f"{host}:{port}")
    with pytest.raises(StartupError, match="cannot listen"):
        await other.start()
    assert other.addresses == []
