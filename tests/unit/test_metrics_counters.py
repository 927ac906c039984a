"""The plain counters a daemon keeps and publishes in its status (metrics/counters.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from aiohttp import web

from snapshotter.metrics.counters import (
    FETCH_BUCKETS_S,
    FUSE_BUCKETS_S,
    DaemonCounters,
    FetchTotals,
    FuseStats,
    Histogram,
    RegistryCounters,
)
from snapshotter.registry.transport import _default_session


def test_histogram_counts_each_observation_in_its_bucket() -> None:
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 7.0, -1.0):
        h.observe(v)
    assert h.counts == [3, 1, 1]
    assert h.count == 5
    assert h.sum == pytest.approx(7.65)
    assert h.cumulative() == [(0.1, 3), (1.0, 4), (math.inf, 5)]


def test_histogram_json_round_trip_and_add() -> None:
    h = Histogram([0.5, 2.0])
    h.observe(1.0)
    back = Histogram.from_json(h.to_json())
    assert (back.bounds, back.counts, back.sum) == (h.bounds, h.counts, h.sum)
    back.add(h)
    assert back.counts == [0, 2, 0] and back.sum == 2.0
    with pytest.raises(ValueError, match="different bounds"):
        back.add(Histogram([1.0]))


@pytest.mark.parametrize("raw", [
    {"bounds": [1.0], "counts": [1], "sum": 0.0},  # one count short (+Inf bucket)
    {"bounds": [1.0], "counts": [1, -1], "sum": 0.0},
    {"bounds": [1.0], "counts": [1, True], "sum": 0.0},
    {"bounds": [2.0, 1.0], "counts": [0, 0, 0], "sum": 0.0},
    {"bounds": [1.0], "counts": [0, 0], "sum": float("nan")},
    {"bounds": "1", "counts": [0, 0], "sum": 0.0},
    [],
])
def test_histogram_from_json_refuses_malformed(raw: Any) -> None:
    with pytest.raises(ValueError):
        Histogram.from_json(raw)


def test_observed_requests_are_counted_timed_and_failures_kept_apart() -> None:
    """What the FUSE session reports per request (``fs.fusesession``: one ``observe`` per
    answered request, the bytes of each READ answer added to ``served_bytes``)."""
    stats = FuseStats()
    stats.observe("read", 0.0002, failed=False)
    stats.observe("read", 0.03, failed=False)
    stats.observe("lookup", 0.00005, failed=False)
    stats.observe("lookup", 0.00005, failed=True)
    stats.observe("mkdir", 0.0, failed=True)  # a write attempt: answered EROFS
    stats.served_bytes += 4096
    assert stats.ops == {"read": 2, "lookup": 2, "mkdir": 1}
    assert stats.errors == {"lookup": 1, "mkdir": 1}
    assert stats.served_bytes == 4096
    read = stats.latency["read"]
    assert read.count == 2 and read.sum == pytest.approx(0.0302)
    assert read.bounds == FUSE_BUCKETS_S
    assert dict(read.cumulative())[0.00025] == 1 and dict(read.cumulative())[0.05] == 2
    assert stats.latency["lookup"].counts[0] == 2  # both within the first bucket
    assert set(stats.latency) == {"read", "lookup", "mkdir"}


def test_fuse_stats_json_round_trip_and_add() -> None:
    stats = FuseStats()
    stats.observe("read", 0.001, failed=False)
    stats.observe("lookup", 0.002, failed=True)
    stats.served_bytes = 42
    back = FuseStats.from_json(stats.to_json())
    assert back.to_json() == stats.to_json()
    back.add(stats)
    assert back.ops == {"read": 2, "lookup": 2} and back.served_bytes == 84
    assert back.latency["read"].count == 2
    assert stats.latency["read"].count == 1  # add copied, did not alias


def test_fetch_totals_record_phases_by_result() -> None:
    fetch = FetchTotals()
    fetch.record("prefetch", True, 100, 0.5)
    fetch.record("prefetch", False, 0, 3.0)
    fetch.record("background", True, 1000, 20.0)
    fetch.record("prefetch", True, 0, None)  # nothing to prefetch: not timed
    assert fetch.bytes == {"prefetch": 100, "background": 1000}
    assert fetch.layers == {("prefetch", "complete"): 1, ("prefetch", "failed"): 1,
                            ("prefetch", "skipped"): 1, ("background", "complete"): 1}
    assert fetch.durations["prefetch"].count == 2
    assert fetch.durations["prefetch"].bounds == FETCH_BUCKETS_S
    assert FetchTotals.from_json(fetch.to_json()).to_json() == fetch.to_json()
    with pytest.raises(ValueError, match="phase"):
        fetch.record("sideways", True, 1, 1.0)


def test_registry_counters_json_round_trip_and_add() -> None:
    reg = RegistryCounters()
    reg.stats.count_request("blob_range", 206)
    reg.stats.count_request("blob_range", None)
    reg.stats.bytes_received = 4096
    reg.stats.retries = 2
    reg.stats.errors["RegistryTimeout"] = 1
    reg.stats.redirects = 3
    reg.latency.observe(0.02)
    back = RegistryCounters.from_json(reg.to_json())
    assert back.to_json() == reg.to_json()
    back.add(reg)
    assert back.stats.requests[("blob_range", "2xx")] == 2
    assert back.stats.bytes_received == 8192 and back.stats.redirects == 6
    assert back.latency.count == 2


def test_daemon_counters_from_older_or_partial_json() -> None:
    assert DaemonCounters.from_json({}).to_json() == DaemonCounters().to_json()
    with pytest.raises(ValueError):
        DaemonCounters.from_json({"fuse": {"ops": {"read": -1}}})
    with pytest.raises(ValueError):
        DaemonCounters.from_json({"registry": {"requests": [["blob", "2xx"]]}})
    with pytest.raises(ValueError):
        DaemonCounters.from_json({"fetch": {"layers": [["prefetch", "x" * 100, 1]]}})


async def test_registry_session_matches_the_transport_default_and_times_requests() -> None:
    reg = RegistryCounters()
    session, default = reg.session_factory(), _default_session()
    try:
        assert session.auto_decompress is default.auto_decompress is False
        assert session.trust_env is default.trust_env is False
        assert session.headers["User-Agent"] == default.headers["User-Agent"]

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.add_routes([web.get("/", ok)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            async with session.get(f"http://{host}:{port}/") as resp:
                assert await resp.text() == "ok"
            with pytest.raises(OSError):
                await session.get(f"http://127.0.0.1:{_closed_port()}/")
        finally:
            await runner.cleanup()
        assert reg.latency.count == 2  # the answered request and the refused one
    finally:
        await session.close()
        await default.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
