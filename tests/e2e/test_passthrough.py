"""Whole files and FUSE passthrough, end to end, in both daemon modes.

A big file (10 MB, three eStargz chunks) read to its end by a container is copied whole
into the chunk cache; with the page cache dropped, a second container reads it again and
the kernel serves it from that cache file itself (FUSE passthrough): the daemon answers
the open in passthrough mode and serves only a fraction of the file's bytes (the rest of
the container's start-up: busybox), and the bytes are the image's.
"""

from __future__ import annotations

import hashlib
import random
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import LazysnapFactory
from .demo import busybox_layer
from .harness import Containerd, Lazysnap, Registry
from .imagebuild import File, Layer
from .procs import free_port, wait_until
from .test_metrics import DATA_PATH, DEADLINE, metrics_config, push_and_convert

pytestmark = pytest.mark.e2e
SIZE = 10_000_000


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture(params=["dedicated", "shared"])
def passthrough_lazysnap(request: pytest.FixtureRequest, lazysnap_factory: LazysnapFactory,
                         metrics_port: int) -> Lazysnap:
    extra = f'[daemon]\nmode = "{request.param}"\n[remote]\nbackground_fetch = false\n'
    return lazysnap_factory(metrics_config(metrics_port, extra))


def fuse_counters(port: int) -> dict[str, float]:
    """The daemons' FUSE reads, served bytes and passthrough opens, from lazysnap's
    metrics endpoint (gathered from the daemons at scrape time)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {"reads": 0.0, "served": 0.0, "passthrough": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lazysnap_fuse_requests_total" and sample.labels["op"] == "read":
                out["reads"] += sample.value
            elif sample.name == "lazysnap_fuse_served_bytes_total":
                out["served"] += sample.value
            elif sample.name == "lazysnap_fuse_passthrough_opens_total":
                out["passthrough"] += sample.value
    return out


def whole_files(lz: Lazysnap) -> list[Path]:
    return sorted(p for p in (lz.root / "cache" / "file").glob("*/*") if p.is_file())


def test_a_big_file_read_once_is_then_read_by_the_kernel_from_the_cache(
    registry: Registry, passthrough_lazysnap: Lazysnap, containerd: Containerd,
    metrics_port: int,
) -> None:
    lz = passthrough_lazysnap
    data = random.Random(7).randbytes(SIZE)
    md5 = hashlib.md5(data).hexdigest()
    _, esgz = push_and_convert(containerd, registry, "lazysnap/passthrough-e2e",
                               [busybox_layer(), Layer([File(DATA_PATH, data)])])
    containerd.rpull(esgz, snapshotter="lazysnap")

    first = containerd.run_container(esgz, "whole-first", "md5sum", DATA_PATH,
                                     snapshotter="lazysnap")
    assert first.stdout.split()[0] == md5
    (stored,) = wait_until(lambda: whole_files(lz) or None, timeout=DEADLINE,
                           what="the file to be stored whole in the cache")
    assert hashlib.md5(stored.read_bytes()).hexdigest() == md5

    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    before = fuse_counters(metrics_port)
    second = containerd.run_container(esgz, "whole-second", "md5sum", DATA_PATH,
                                      snapshotter="lazysnap")
    assert second.stdout.split()[0] == md5
    after = fuse_counters(metrics_port)
    assert after["passthrough"] >= before["passthrough"] + 1, (before, after)
    # The daemon served busybox and such, not the 10 MB: the kernel read the cache file.
    assert after["served"] - before["served"] < SIZE / 2, (before, after)
