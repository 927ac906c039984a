"""Registry host configuration (snapshotter.registry.hosts)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from snapshotter.errdefs import ConfigError
from snapshotter.registry.hosts import DEFAULTS, Endpoint, HostsConfig


def test_defaults_match_the_documented_table() -> None:
    from_empty = HostsConfig.from_dict({})
    assert from_empty == HostsConfig()
    assert from_empty == HostsConfig.from_dict(dict(DEFAULTS))
    for f in dataclasses.fields(HostsConfig):
        assert f.name in DEFAULTS
    assert set(DEFAULTS) == {f.name for f in dataclasses.fields(HostsConfig)}
    assert from_empty.docker_config == "/root/.docker/config.json"
    assert HostsConfig.from_dict({"docker_config": ""}).docker_config == DEFAULTS["docker_config"]


def test_every_key_is_documented() -> None:
    import snapshotter.registry.hosts as hosts

    assert hosts.__doc__ is not None
    for key, default in DEFAULTS.items():
        assert f"``{key}``" in hosts.__doc__
        if not isinstance(default, dict | list):
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            assert shown in hosts.__doc__, key


def test_from_dict_reads_every_key() -> None:
    cfg = HostsConfig.from_dict(
        {
            "mirrors": {"docker.io": ["http://127.0.0.1:5001", "https://mirror.example"]},
            "insecure": ["reg.internal:5000"],
            "docker_config": "/tmp/config.json",
            "request_timeout": 3,
            "connect_timeout": 1.5,
            "deadline": 10,
            "max_retries": 0,
            "max_concurrency": 2,
            "multi_range": False,
            "max_ranges_per_request": 4,
            "coalesce_gap": 0,
            "max_request_bytes": 1024,
        }
    )
    assert cfg.request_timeout == 3.0 and isinstance(cfg.request_timeout, float)
    assert cfg.max_retries == 0 and cfg.multi_range is False
    assert cfg.endpoints("docker.io") == [
        Endpoint("http", "127.0.0.1:5001", is_mirror=True),
        Endpoint("https", "mirror.example", is_mirror=True),
        Endpoint("https", "registry-1.docker.io"),
    ]
    assert cfg.endpoints("reg.internal:5000") == [Endpoint("http", "reg.internal:5000")]
    assert cfg.endpoints("reg.internal:5001") == [Endpoint("https", "reg.internal:5001")]


@pytest.mark.parametrize(
    ("host", "scheme"),
    [
        ("localhost", "http"),
        ("localhost:5000", "http"),
        ("127.0.0.1:5000", "http"),
        ("127.0.0.1", "http"),
        ("[::1]:5000", "http"),
        ("ghcr.io", "https"),
        ("docker.io", "https"),
        ("10.0.0.1:5000", "https"),
    ],
)
def test_origin_scheme(host: str, scheme: str) -> None:
    (origin,) = HostsConfig().endpoints(host)
    assert origin.scheme == scheme and not origin.is_mirror
    assert origin.base_url == f"{scheme}://{origin.host}"


@pytest.mark.parametrize(
    "table",
    [
        {"nope": 1},
        {"mirrors": []},
        {"mirrors": {"docker.io": "http://x"}},
        {"mirrors": {"docker.io": ["ftp://x"]}},
        {"mirrors": {"docker.io": ["http://x/path"]}},
        {"mirrors": {"docker.io": ["http://x?q=1"]}},
        {"mirrors": {"bad host": ["http://x"]}},
        {"insecure": "x"},
        {"insecure": [1]},
        {"docker_config": 3},
        {"request_timeout": 0},
        {"request_timeout": -1.0},
        {"request_timeout": "5"},
        {"deadline": True},
        {"deadline": float("inf")},
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_concurrency": 0},
        {"multi_range": 1},
        {"max_ranges_per_request": 0},
        {"coalesce_gap": -1},
        {"max_request_bytes": 0},
    ],
)
def test_from_dict_rejects(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        HostsConfig.from_dict(table)


def test_mirror_credentials_are_rejected_without_echo() -> None:
    with pytest.raises(ConfigError) as info:
        HostsConfig.from_dict({"mirrors": {"docker.io": ["https://user:hunter2@mirror.example"]}})
    assert "hunter2" not in str(info.value)
