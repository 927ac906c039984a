"""bench.wan and bench.env: the link arithmetic, parsers and access-log accounting."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import env, wan


@pytest.mark.parametrize(("text", "bits"), [
    ("100mbit", 100_000_000), ("1gbit", 1_000_000_000), ("500kbit", 500_000),
    ("2.5mbit", 2_500_000), ("8000", 8000), ("0", 0), ("100Mbit/s", 100_000_000),
])
def test_parse_rate(text: str, bits: int) -> None:
    assert wan.parse_rate(text) == bits


@pytest.mark.parametrize(("text", "seconds"), [
    ("20ms", 0.02), ("0.5s", 0.5), ("300us", 0.0003), ("40", 0.04),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert wan.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["fast", "10 parsecs", "-5mbit", ""])
def test_parsers_refuse_nonsense(bad: str) -> None:
    with pytest.raises(ValueError):
        wan.parse_rate(bad)
    with pytest.raises(ValueError):
        wan.parse_duration(bad)


def test_link_arithmetic_at_the_default_link() -> None:
    link = wan.LinkSpec(100_000_000, 0.020)
    assert link.rate_bytes == 12_500_000
    assert link.one_way_s == pytest.approx(0.010)
    assert link.bdp_bytes == 250_000
    # a 1 ms bucket (12.5 kB) is smaller than a GSO packet: the bucket holds one of those
    assert link.tbf_burst_bytes() == 64 * 1024 + 1500
    assert link.tbf_limit_bytes() == 4 * link.tbf_burst_bytes()  # 268 kB > the BDP
    # the proxy must hold what arrives during one one-way delay, four times over
    assert link.proxy_queue_bytes() == 500_000
    assert link.transfer_seconds(12_500_000) == pytest.approx(1.0)


def test_link_arithmetic_scales_with_rate() -> None:
    fast = wan.LinkSpec(10_000_000_000, 0.1)
    assert fast.tbf_burst_bytes() == 1_250_000  # 1 ms of line rate
    assert fast.tbf_limit_bytes() == fast.bdp_bytes == 125_000_000
    slow = wan.LinkSpec(1_000_000, 0.001)
    assert slow.proxy_queue_bytes() == 256 * 1024  # never below the floor
    unlimited = wan.LinkSpec(0, 0.02)
    assert unlimited.transfer_seconds(1 << 30) == 0.0
    assert unlimited.proxy_queue_bytes() == 64 << 20


def test_pick_subnet_avoids_used_addresses_and_stays_in_the_bench_range() -> None:
    host, reg = wan.pick_subnet(set(), seed=0)
    assert (host, reg) == ("198.18.0.1", "198.18.0.2")
    host2, reg2 = wan.pick_subnet({"198.18.0.1"}, seed=0)
    assert (host2, reg2) == ("198.18.0.5", "198.18.0.6")
    for seed in (1, 63, 64, 12345, 99999):
        h, r = wan.pick_subnet(set(), seed)
        assert h.startswith("198.18.") and r.startswith("198.18.")
        assert int(r.rsplit(".", 1)[1]) == int(h.rsplit(".", 1)[1]) + 1
        assert int(h.rsplit(".", 1)[1]) % 4 == 1  # a /30's first host address


ACCESS_LOG = """\
127.0.0.1 - - [22/Nov/2026:04:52:52 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
time="2026-11-22T04:52:52Z" level=info msg="response completed" http.response.written=999
127.0.0.1 - - [22/Nov/2026:04:52:53 +0000] "GET /v2/x/blobs/sha256:ab HTTP/1.1" 206 4096 "" "a"
127.0.0.1 - - [22/Nov/2026:04:52:53 +0000] "HEAD /v2/bench/x/manifests/esgz HTTP/1.1" 200 0 "" "ctr"
127.0.0.1 - - [22/Nov/2026:04:52:53 +0000] "PUT /v2/bench/x/blobs/uploads/1 HTTP/1.1" 201 0 "" "ctr"
127.0.0.1 - - [22/Nov/2026:04:52:54 +0000] "GET /v2/bench/x/blobs/sha256:cd HTTP/1.1" 404 - "" "x"
"""


def test_registry_bytes_counts_reads_under_v2_only() -> None:
    assert env.registry_bytes(ACCESS_LOG) == 2 + 4096


def test_access_log_counts_from_a_mark(tmp_path: Path) -> None:
    path = tmp_path / "registry.log"
    log = env.AccessLog(path)
    assert log.mark() == 0
    path.write_text(ACCESS_LOG)
    mark = log.mark()
    with path.open("a") as f:
        f.write('1.2.3.4 - - [x] "GET /v2/a/blobs/sha256:ef HTTP/1.1" 200 100 "" "y"\n')
    assert log.bytes_since(0) == 2 + 4096 + 100
    assert log.bytes_since(mark) == 100


def test_parse_extra_snapshotter() -> None:
    v = env.parse_extra("stargz=/run/containerd-stargz-grpc/containerd-stargz-grpc.sock")
    assert v.name == "stargz" and v.lazy and not v.ours
    for bad in ("stargz", "=/x", "a b=/x", "stargz=relative.sock"):
        with pytest.raises(ValueError):
            env.parse_extra(bad)
