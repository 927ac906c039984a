"""The emulated WAN between containerd/lazysnap and the registry, and the registry on it.

Topology (with shaping; ``--no-shaping`` gives a plain registry on 127.0.0.1)::

    containerd, lazysnap ──loopback──▶ delay proxy ──veth (tbf both ways)──▶ registry
      (host namespace)      127.0.0.1:P  (bench.delayproxy)  198.18.N.1 ─── 198.18.N.2:5000
                                                                     (netns lzbench-<pid>)

* **Rate**: tbf on the egress of both veth ends (one per direction), burst and queue
  sized by :meth:`LinkSpec.tbf_burst_bytes` / :meth:`LinkSpec.tbf_limit_bytes`.
* **Delay**: the kernel here has no sch_netem, so the round trip is added by
  ``bench.delayproxy`` (rtt/2 per direction, order kept, bounded queue, handshake
  charged). Its upstream socket is pinned to the veth (SO_BINDTODEVICE).
* **Addresses**: a /30 of 198.18.0.0/15, the range RFC 2544 sets aside for benchmarks,
  picked so as not to clash with an address already on this machine. Both ends live on
  this machine; nothing is routed anywhere else.

Everything created here is removed by ``close`` (and by deleting the namespace, which
takes the veth pair with it).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import REPO_ROOT, Registry
from tests.e2e.procs import HarnessError, ManagedProcess, free_port, tail, wait_until

REGISTRY_PORT = 5000
BENCH_NET = (198, 18)
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_rate(text: str) -> int:
    """``"100mbit"``, ``"1gbit"``, ``"500kbit"`` or a plain number of bit/s -> bit/s.

    ``0`` means unlimited. Raises ValueError for anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit(?:/s)?|bps)?\s*", text.lower())
    if m is None:
        raise ValueError(f"not a rate: {text!r} (say 100mbit)")
    return int(float(m.group(1)) * _RATE_UNITS[m.group(2)])


def parse_duration(text: str) -> float:
    """``"20ms"``, ``"0.5s"``, ``"300us"`` or a plain number of milliseconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|ms|us)?\s*", text.lower())
    if m is None:
        raise ValueError(f"not a duration: {text!r} (say 20ms)")
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or "ms"]


@dataclass(frozen=True)
class LinkSpec:
    """A symmetric link: ``rate_bits`` per second each way (0 = unlimited) and ``rtt_s``."""

    rate_bits: int
    rtt_s: float

    @property
    def rate_bytes(self) -> float:
        """Bytes per second each way (0.0 when unlimited)."""
        return self.rate_bits / 8

    @property
    def one_way_s(self) -> float:
        """The delay added to each direction."""
        return self.rtt_s / 2

    @property
    def bdp_bytes(self) -> int:
        """Bandwidth-delay product: bytes in flight on the full round trip."""
        return int(self.rate_bytes * self.rtt_s)

    def tbf_burst_bytes(self, mtu: int = 1500) -> int:
        """tbf bucket: 1 ms of line rate, at least one 64 KiB GSO packet plus an MTU
        (smaller buckets make tbf split every GSO packet, which costs CPU)."""
        return max(int(self.rate_bytes / 1000), 64 * 1024 + mtu)

    def tbf_limit_bytes(self) -> int:
        """tbf queue: one bandwidth-delay product (a typical WAN buffer), at least four
        buckets so that a burst is never dropped on arrival."""
        return max(self.bdp_bytes, 4 * self.tbf_burst_bytes())

    def proxy_queue_bytes(self) -> int:
        """What the delay proxy may hold per direction: four times what the link carries
        during one one-way delay (it must hold rate x delay to keep the link busy)."""
        if self.rate_bits == 0:
            return 64 << 20
        return max(int(4 * self.rate_bytes * self.one_way_s), 256 * 1024)

    def transfer_seconds(self, nbytes: int) -> float:
        """The lower bound the link puts on moving ``nbytes`` (0.0 when unlimited)."""
        return nbytes / self.rate_bytes if self.rate_bits else 0.0


def pick_subnet(used: set[str], seed: int) -> tuple[str, str]:
    """(host end, registry end) of a /30 in 198.18.0.0/16 whose addresses are not in
    ``used``; the search starts at a slot derived from ``seed`` (say, the pid)."""
    slots = 256 * 64
    for i in range(slots):
        slot = (seed + i) % slots
        third, base = slot // 64, (slot % 64) * 4
        host = f"{BENCH_NET[0]}.{BENCH_NET[1]}.{third}.{base + 1}"
        reg = f"{BENCH_NET[0]}.{BENCH_NET[1]}.{third}.{base + 2}"
        if host not in used and reg not in used:
            return host, reg
    raise HarnessError("no free /30 in 198.18.0.0/16")


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise HarnessError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")


def _addresses_in_use() -> set[str]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                         check=False, timeout=30).stdout
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", out))


class WanLink:
    """A network namespace reached over a veth pair shaped with tbf in both directions."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        tag = os.getpid() % 100000
        self.netns = f"lzbench-{tag}"
        self.host_dev, self.ns_dev = f"lzb{tag}h", f"lzb{tag}r"
        self.host_ip, self.ns_ip = pick_subnet(_addresses_in_use(), os.getpid())
        self._up = False

    def netns_argv(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def _tbf(self, *prefix: str, dev: str) -> None:
        spec = self.spec
        _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
             "rate", f"{spec.rate_bits}bit", "burst", str(spec.tbf_burst_bytes()),
             "limit", str(spec.tbf_limit_bytes()))

    def open(self) -> None:
        """Create namespace, veth pair, addresses and the tbf qdiscs. HarnessError on
        failure (after removing whatever was made)."""
        try:
            _run("ip", "netns", "add", self.netns)
            self._up = True
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name",
                 self.ns_dev, "netns", self.netns)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            ns = ("ip", "netns", "exec", self.netns)
            _run(*ns, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
            _run(*ns, "ip", "link", "set", self.ns_dev, "up")
            _run(*ns, "ip", "link", "set", "lo", "up")
            if self.spec.rate_bits:
                self._tbf(dev=self.host_dev)
                self._tbf(*ns, dev=self.ns_dev)
        except HarnessError:
            self.close()
            raise

    def close(self) -> None:
        """Delete the namespace (and with it the veth pair); idempotent."""
        if self._up:
            subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True,
                           check=False, timeout=60)
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True,
                           check=False, timeout=60)
            self._up = False


class NetnsRegistry:
    """docker-registry inside a ``WanLink``'s namespace, reached through the delay proxy.

    Same surface as the harness's ``Registry`` for the bench: ``host`` (what clients use,
    ``127.0.0.1:<proxy port>``), ``url``, ``log_path`` (the registry's access log),
    ``start`` and ``stop``.
    """

    def __init__(self, workdir: Path, storage: Path, link: WanLink) -> None:
        self.workdir = workdir
        self.storage = storage
        self.link = link
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self.proxy_log = workdir / "delayproxy.log"
        self.port = free_port()
        self._registry: ManagedProcess | None = None
        self._proxy: ManagedProcess | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:<proxy port>``: what clients dial."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://`` + host."""
        return f"http://{self.host}"

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def start(self, timeout: float = 60.0) -> None:
        """Start registry and proxy; return when ``GET /v2/`` answers through the link."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: {self.link.ns_ip}:{REGISTRY_PORT}\n")
        self._registry = ManagedProcess(
            self.link.netns_argv("docker-registry", "serve", str(self.config_path)),
            self.log_path)
        self._registry.start()
        spec = self.link.spec
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self._proxy = ManagedProcess(
            [sys.executable, "-m", "bench.delayproxy", "--listen", self.host,
             "--upstream", f"{self.link.ns_ip}:{REGISTRY_PORT}",
             "--delay", repr(spec.one_way_s), "--queue-bytes", str(spec.proxy_queue_bytes()),
             "--bind-device", self.link.host_dev],
            self.proxy_log, env=env, cwd=REPO_ROOT)
        self._proxy.start()
        try:
            wait_until(self._answers, timeout=timeout, what=f"registry through {self.host}",
                       alive=lambda: self._registry_dead() or self._proxy_dead())
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc}\n--- registry log ---\n{tail(self.log_path)}\n"
                               f"--- proxy log ---\n{tail(self.proxy_log)}") from exc

    def _registry_dead(self) -> str | None:
        return self._registry.exit_reason() if self._registry else "never started"

    def _proxy_dead(self) -> str | None:
        return self._proxy.exit_reason() if self._proxy else "never started"

    def stop(self) -> None:
        """Stop proxy and registry; idempotent."""
        for proc in (self._proxy, self._registry):
            if proc is not None:
                proc.stop(grace=10)


def loopback_registry(workdir: Path, storage: Path) -> Registry:
    """The harness's registry on 127.0.0.1 serving ``storage`` (no shaping)."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    link = workdir / "storage"
    if not link.is_symlink():
        link.symlink_to(storage)
    return Registry(workdir)


@dataclass(frozen=True)
class LinkMeasurement:
    """What a plain HTTP client sees over the link."""

    rtt_s: float  # median time of a small GET on a kept-alive connection
    connect_rtt_s: float  # median time of a small GET on a new connection
    rate_bits: float  # throughput of one large ranged GET
    probe_bytes: int


def _timed_get(conn: http.client.HTTPConnection, path: str,
               headers: dict[str, str] | None = None) -> tuple[float, int]:
    start = time.perf_counter()
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    n = 0
    while chunk := resp.read(1 << 20):
        n += len(chunk)
    return time.perf_counter() - start, n


def measure_link(host: str, blob_path: str, nbytes: int, samples: int = 9) -> LinkMeasurement:
    """Measure round trip and rate with plain GETs: ``/v2/`` on one kept-alive connection
    and on new connections (median of ``samples``), then ``nbytes`` of ``blob_path``
    (a registry blob URL path) with one ranged GET."""
    name, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(name, int(port), timeout=120)
    try:
        _timed_get(conn, "/v2/")  # warm the connection
        kept = [_timed_get(conn, "/v2/")[0] for _ in range(samples)]
        elapsed, got = _timed_get(conn, blob_path, {"Range": f"bytes=0-{nbytes - 1}"})
    finally:
        conn.close()
    fresh: list[float] = []
    for _ in range(samples):
        c = http.client.HTTPConnection(name, int(port), timeout=60)
        with contextlib.closing(c):
            c.sock = socket.create_connection((name, int(port)))
            start = time.perf_counter()
            c.request("GET", "/v2/")
            c.getresponse().read()
            fresh.append(time.perf_counter() - start)
    rtt = statistics.median(kept)
    transfer = elapsed - rtt  # the request's own round trip is not transfer time
    return LinkMeasurement(rtt, statistics.median(fresh),
                           got * 8 / transfer if transfer > 0 else 0.0, got)
