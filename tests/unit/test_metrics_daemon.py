"""A daemon's counters reach the metrics through its real control socket: a LayerManager
with fake blobs behind a ControlServer, polled by the scrape-time Poller."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.daemonapi.client import ControlClient
from snapshotter.daemonapi.status import DaemonStatus
from snapshotter.errdefs import RegistryUnavailable
from snapshotter.fs.control import ControlServer
from snapshotter.fs.layers import LayerManager
from snapshotter.fs.ops import LayerOperations
from snapshotter.fs.read.fetchpolicy import FetchPolicy, FetchProgress
from snapshotter.metastore.daemons import DaemonRecord, DaemonState
from snapshotter.metrics.collector import Poller
from snapshotter.metrics.counters import DaemonCounters, RegistryCounters
from snapshotter.metrics.families import Metrics
from tests.unit.test_fs_control import Source, spec
from tests.unit.test_fs_fetchpolicy import LOG, Bulk, layer


@dataclass
class OneDaemon:
    recs: list[DaemonRecord] = field(default_factory=list)
    restarts_total: int = 0
    reattached_total: int = 0

    def records(self) -> list[DaemonRecord]:
        return self.recs


async def test_prefetch_and_fuse_counters_reach_the_scrape(tmp_path: Path) -> None:
    source, counters = Source(), DaemonCounters()
    ops = LayerOperations(shared=False)
    manager = LayerManager(
        mode="dedicated", mountpoint=str(tmp_path / "mnt"), ops=ops,
        cache=ChunkCache(tmp_path / "cache", 1 << 24), source=source,
        openers={"estargz": source.open_layer}, counters=counters,
    )
    path = str(tmp_path / "control.sock")
    server = ControlServer(manager, path)
    await server.start()
    try:
        client = ControlClient(path)
        await client.add_layer(spec(7))
        await client.wait_ready(7, timeout=30)
        # what the FUSE session reports for a STATFS and a 4 KiB READ it answered
        counters.fuse.observe("statfs", 0.0001, failed=False)
        counters.fuse.observe("read", 0.002, failed=False)
        counters.fuse.served_bytes += 4096
        table = OneDaemon([DaemonRecord(id="layer-7", mode="dedicated", control=path,
                                        mountpoint="/m", state=DaemonState.RUNNING,
                                        pid=os.getpid())])
        metrics = Metrics(CollectorRegistry())
        metrics.watch(Poller(table, RegistryCounters(), daemon_mode="dedicated",
                             cache_limit_bytes=1 << 24))
        await metrics.refresh()
    finally:
        await server.aclose()
        await manager.aclose()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("lazysnap_daemon_up", daemon="layer-7") == 1
    assert value("lazysnap_fetch_layers_total", phase="prefetch", result="complete") == 1
    assert (value("lazysnap_fetch_bytes_total", phase="prefetch") or 0) > 0
    assert value("lazysnap_fetch_duration_seconds_count", phase="prefetch") == 1
    assert value("lazysnap_fuse_requests_total", op="statfs") == 1
    assert value("lazysnap_fuse_request_errors_total", op="read") == 0
    assert value("lazysnap_fuse_request_duration_seconds_count", op="read") == 1
    assert value("lazysnap_fuse_served_bytes_total") == 4096
    assert (value("lazysnap_cache_stored_bytes_total") or 0) > 0
    labels = {"snapshot_id": "7", "digest": spec(7).digest}
    assert value("lazysnap_layer_ready", **labels) == 1
    assert value("lazysnap_layer_size_bytes", **labels) == source.index.blob_size


def test_status_from_an_older_daemon_without_counters_parses() -> None:
    raw = {"state": "running", "pid": 1, "mode": "shared", "mountpoint": "/m", "layers": [],
           "cache": {}, "reader": {}, "rss_bytes": 0}
    assert DaemonStatus.from_json(raw).counters == {}


async def test_fetch_progress_records_bytes_and_whether_a_phase_ran() -> None:
    index, files = layer()
    progress = FetchProgress()
    await FetchPolicy(30, background=False).prefetch(Bulk(), index, progress, LOG)
    assert (progress.prefetch_done, progress.prefetch_seconds) == (True, None)  # nothing
    index.prefetch_inos = [files["a"].ino]
    await FetchPolicy(30, background=True).prefetch(Bulk(), index, progress, LOG)
    assert progress.prefetch_bytes == files["a"].size
    assert progress.prefetch_seconds is not None and progress.prefetch_seconds >= 0
    failing = FetchProgress()
    await FetchPolicy(30, background=True).background_fetch(
        Bulk(fail=RegistryUnavailable("down")), index, failing, LOG)
    assert failing.background_bytes == 0 and failing.background_seconds is not None
    assert not failing.fully_fetched
