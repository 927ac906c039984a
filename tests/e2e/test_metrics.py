"""Issue 6, end to end: a real Prometheus scrapes lazysnap during lazy pulls and a fallback.

Prometheus (the Debian package) runs with a generated configuration, its own TSDB in the
test's workdir and a 1 s scrape interval. While it scrapes, an eStargz image (converted by
``ctr-remote`` in the test's own containerd) is pulled lazily and a container reads a file
from it, and a plain gzip image falls back to an ordinary pull. The test then asks
Prometheus's HTTP API, not lazysnap, for what it saw: the target is up and the series for
remote snapshots, FUSE reads, registry bytes, per-layer fetch progress and the
``not_estargz`` fallback are non-zero. ``promtool check metrics`` checks the live exposition.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import LazysnapFactory, attached_log
from .demo import busybox_layer
from .harness import Containerd, Lazysnap, Registry
from .imagebuild import File, Layer, PushedImage, build_and_push
from .procs import HarnessError, ManagedProcess, free_port, wait_until

pytestmark = pytest.mark.e2e

DEADLINE = 90.0  # bounds how long a broken system takes to fail; not a timing assertion
DATA_PATH = "/data/blob.bin"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_prometheus() -> tuple[str, str]:
    """The ``prometheus`` and ``promtool`` binaries; fails (never skips) without them."""
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install the Debian package 'prometheus'"
                    " (scripts/install-deps.sh does)", pytrace=False)
    return str(found["prometheus"]), str(found["promtool"])


def http_get(url: str, timeout: float = 10.0, headers: dict[str, str] | None = None) -> bytes:
    """The body of a GET, never through a proxy; urllib errors propagate."""
    request = urllib.request.Request(url, headers=headers or {})
    with _OPENER.open(request, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body


class Prometheus:
    """A Prometheus server scraping ``target`` every second, its TSDB in ``workdir``."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.target = target
        self.port = free_port()
        self._proc = ManagedProcess([
            binary, f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], self.log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        try:
            return http_get(f"{self.url}/-/ready", timeout=2) != b""
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        """Write the configuration, start, and wait for ``/-/ready``; HarnessError."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: lazysnap\n"
            f"    static_configs:\n      - targets: ['{self.target}']\n")
        self._proc.start()
        wait_until(self._ready, timeout=DEADLINE, what="prometheus /-/ready",
                   alive=self._proc.exit_reason)

    def stop(self) -> None:
        self._proc.stop(grace=15)

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful API answer; HarnessError otherwise."""
        query = urllib.parse.urlencode(params)
        raw = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        if raw.get("status") != "success":
            raise HarnessError(f"prometheus {path} {params}: {raw}")
        return raw["data"]

    def values(self, expr: str) -> dict[str, float]:
        """An instant query's samples: rendered label set -> value."""
        data = self.api("query", query=expr)
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
                for r in data["result"]}

    def target_health(self) -> str | None:
        """The health (``up``, ``down``, ``unknown``) of the scraped target."""
        for target in self.api("targets")["activeTargets"]:
            if target["labels"].get("instance") == self.target:
                return str(target["health"])
        return None


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def prometheus(request: pytest.FixtureRequest, e2e_workdir: Path,
               metrics_port: int) -> Iterator[Prometheus]:
    binary, _ = require_prometheus()
    prom = Prometheus(binary, e2e_workdir / "prometheus", f"127.0.0.1:{metrics_port}")
    try:
        with attached_log(request, "prometheus log", prom.log_path, lines=40):
            prom.start()
            yield prom
    finally:
        prom.stop()


def metrics_config(port: int, extra: str = "") -> str:
    """lazysnap config text with the metrics endpoint on 127.0.0.1:``port``."""
    return f'[metrics]\naddress = "127.0.0.1:{port}"\n{extra}'


@pytest.fixture
def metrics_lazysnap(lazysnap_factory: LazysnapFactory, metrics_port: int) -> Lazysnap:
    """lazysnap with its metrics on ``metrics_port``. A fixture, so that it starts before
    the ``containerd`` fixture: a containerd whose first dials of the proxy socket found
    nothing backs off, and a Prepare in that window fails at once ("dial ... timeout")."""
    # Unverified layers are allowed only for the plain image, whose pull asks for it, so
    # that its fallback reason is the format check's whatever the order of the checks.
    return lazysnap_factory(metrics_config(metrics_port,
                                           "[remote]\nallow_no_verification = true\n"))


def push_and_convert(containerd: Containerd, registry: Registry, name: str,
                     layers: list[Layer]) -> tuple[PushedImage, str]:
    """Push a gzip image, convert it to eStargz with ctr-remote in ``containerd`` (pulled
    on overlayfs first) and push that as ``<ref>-esgz``; both images are then removed from
    containerd so that the lazy pull starts from nothing. Returns (source, eStargz ref)."""
    source = build_and_push(registry.host, name, "src", layers, cmd=["/bin/sh"])
    esgz = f"{source.reference}-esgz"
    containerd.pull(source.reference, snapshotter="overlayfs")
    containerd.ctr("image", "convert", "--estargz", "--oci", source.reference, esgz,
                   binary="ctr-remote", timeout=300)
    containerd.ctr("image", "push", "--plain-http", esgz, timeout=300)
    containerd.ctr("image", "rm", "--sync", source.reference, esgz)
    return source, esgz


def data_layer(seed: int, size: int) -> Layer:
    data = bytes((i * seed + (i >> 8)) & 0xFF for i in range(size))
    return Layer([File(DATA_PATH, data)])


def test_prometheus_sees_lazy_pulls_reads_and_fallbacks(
    registry: Registry, metrics_lazysnap: Lazysnap, containerd: Containerd,
    prometheus: Prometheus, metrics_port: int,
) -> None:
    _, promtool = require_prometheus()
    lz = metrics_lazysnap
    wait_until(lambda: prometheus.target_health() == "up", timeout=DEADLINE,
               what="prometheus to scrape lazysnap")

    _, esgz = push_and_convert(containerd, registry, "lazysnap/metrics-e2e",
                               [busybox_layer(), data_layer(7, 2 << 20)])
    containerd.rpull(esgz, snapshotter="lazysnap")
    result = containerd.run_container(esgz, "metrics-read", "sh", "-c",
                                      f"wc -c < {DATA_PATH}", snapshotter="lazysnap")
    assert result.stdout.strip() == str(2 << 20)
    plain = build_and_push(registry.host, "lazysnap/metrics-plain", "gzip",
                           [data_layer(3, 4096)], cmd=["/bin/sh"])
    containerd.rpull(plain.reference, snapshotter="lazysnap", extra=("--skip-content-verify",))

    def positive(expr: str) -> dict[str, float] | None:
        found = {k: v for k, v in prometheus.values(expr).items() if v > 0}
        return found or None

    def total_reaches(expr: str, expected: float) -> bool:
        return sum(prometheus.values(expr).values()) == expected

    # Both layers of the eStargz image became remote snapshots (the last scrapes may lag).
    wait_until(lambda: total_reaches('lazysnap_remote_snapshots_total{format="estargz"}', 2),
               timeout=DEADLINE, what="2 remote snapshots in prometheus")
    wait_until(lambda: positive('lazysnap_fuse_requests_total{op="read"}'),
               timeout=DEADLINE, what="FUSE reads in prometheus")
    wait_until(lambda: positive("lazysnap_fuse_served_bytes_total"),
               timeout=DEADLINE, what="FUSE bytes served in prometheus")
    wait_until(lambda: positive('lazysnap_registry_received_bytes_total{source="daemons"}'),
               timeout=DEADLINE, what="registry bytes in prometheus")
    layers = wait_until(lambda: positive("lazysnap_layer_fetched_bytes"),
                        timeout=DEADLINE, what="per-layer fetch progress in prometheus")
    assert all(json.loads(k)["digest"].startswith("sha256:") for k in layers)
    wait_until(lambda: total_reaches('lazysnap_remote_fallbacks_total{reason="not_estargz"}',
                                     len(plain.layers)),
               timeout=DEADLINE, what="the not_estargz fallback in prometheus")
    assert positive('lazysnap_daemons{state="running"}') is not None
    assert positive("lazysnap_daemon_rss_bytes") is not None
    assert positive('lazysnap_grpc_requests_total{method="Prepare"}') is not None
    assert prometheus.target_health() == "up"

    exposition = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=exposition,
                           capture_output=True, timeout=60, check=False)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()

    # One log line per decision, naming the layer and the reason.
    log = lz.log_path.read_text()
    for layer in plain.layers:
        lines = [line for line in log.splitlines()
                 if "remote decision:" in line and f"layer {layer.digest} " in line]
        assert len(lines) == 1 and "reason=not_estargz" in lines[0], lines
