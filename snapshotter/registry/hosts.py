"""Registry host configuration: mirrors, plain-HTTP hosts, credentials file, limits.

Built from the ``[registry]`` table of the configuration file by :meth:`HostsConfig.from_dict`.
Every key is optional; unknown keys and wrongly typed values raise ``ConfigError``.

``mirrors`` -- table of host -> list of URL strings; default ``{}``
    Mirror endpoints tried in order before the origin host, e.g.
    ``mirrors = {"docker.io" = ["http://127.0.0.1:5001"]}``.
``insecure`` -- list of ``host[:port]`` strings; default ``[]``
    Hosts reached over plain HTTP. ``localhost``, ``127.0.0.1`` and ``::1`` (any port)
    always are; every other host is reached over HTTPS.
``docker_config`` -- string (path); default ``/root/.docker/config.json``
    A docker ``config.json`` holding credentials. A missing file means anonymous access;
    an empty string means the default.
``request_timeout`` -- float, seconds; default ``30.0``
    Time for one HTTP request, body included.
``connect_timeout`` -- float, seconds; default ``5.0``
    Time to open one TCP/TLS connection.
``deadline`` -- float, seconds; default ``60.0``
    Time for one operation (a manifest, a size, one range request) with all its retries.
``max_retries`` -- int, count >= 0; default ``4``
    Retries after the first attempt (so at most ``max_retries + 1`` attempts).
``max_concurrency`` -- int >= 1; default ``8``
    Requests in flight at once per registry host.
``multi_range`` -- bool; default ``true``
    Send several byte ranges in one request; a host that refuses them is switched to one
    range per request for the life of the client.
``max_ranges_per_request`` -- int >= 1; default ``16``
    Ranges in one multi-range request.
``coalesce_gap`` -- int, bytes >= 0; default ``65536``
    Ranges closer than this are fetched as one range.
``max_request_bytes`` -- int, bytes >= 1; default ``8388608`` (8 MiB)
    Ranges are split into pieces of at most this size, and a multi-range request asks for
    at most this many bytes.

Mirror endpoint URLs must be ``http://`` or ``https://`` with a host and no user info,
query or path (other than ``/``). Mirror keys and ``insecure`` entries use the same host
normalisation as image references (``docker.io`` means ``registry-1.docker.io``).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from snapshotter.errdefs import ConfigError, InvalidArgument
from snapshotter.registry.reference import normalize_host

DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "mirrors": {},
        "insecure": [],
        "docker_config": "/root/.docker/config.json",
        "request_timeout": 30.0,
        "connect_timeout": 5.0,
        "deadline": 60.0,
        "max_retries": 4,
        "max_concurrency": 8,
        "multi_range": True,
        "max_ranges_per_request": 16,
        "coalesce_gap": 65536,
        "max_request_bytes": 8 * 1024 * 1024,
    }
)
"""The default of every key (a read-only view; copy it before changing)."""

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Endpoint:
    """One place to send registry API requests for a host.

    ``host`` is ``host[:port]`` as it appears in a URL (IPv6 in brackets); ``scheme`` is
    ``https`` or ``http``; ``is_mirror`` is False only for the origin.
    """

    scheme: str
    host: str
    is_mirror: bool = False

    @property
    def base_url(self) -> str:
        """``scheme://host`` without a trailing slash."""
        return f"{self.scheme}://{self.host}"


@dataclass(frozen=True)
class HostsConfig:
    """Validated ``[registry]`` settings; see the module docstring for each key."""

    mirrors: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()
    docker_config: str = DEFAULTS["docker_config"]
    request_timeout: float = DEFAULTS["request_timeout"]
    connect_timeout: float = DEFAULTS["connect_timeout"]
    deadline: float = DEFAULTS["deadline"]
    max_retries: int = DEFAULTS["max_retries"]
    max_concurrency: int = DEFAULTS["max_concurrency"]
    multi_range: bool = DEFAULTS["multi_range"]
    max_ranges_per_request: int = DEFAULTS["max_ranges_per_request"]
    coalesce_gap: int = DEFAULTS["coalesce_gap"]
    max_request_bytes: int = DEFAULTS["max_request_bytes"]

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> HostsConfig:
        """Build from a plain mapping (the parsed ``[registry]`` table).

        Raises ConfigError naming the key for unknown keys, wrong types or bad values.
        """
        unknown = sorted(set(table) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"registry: unknown key(s) {', '.join(unknown)}")
        return cls(
            mirrors=_mirrors(table.get("mirrors", {})),
            insecure=frozenset(_host_key("insecure", h) for h in _str_list(table, "insecure")),
            docker_config=_str(table, "docker_config") or DEFAULTS["docker_config"],
            request_timeout=_seconds(table, "request_timeout"),
            connect_timeout=_seconds(table, "connect_timeout"),
            deadline=_seconds(table, "deadline"),
            max_retries=_int(table, "max_retries", minimum=0),
            max_concurrency=_int(table, "max_concurrency", minimum=1),
            multi_range=_bool(table, "multi_range"),
            max_ranges_per_request=_int(table, "max_ranges_per_request", minimum=1),
            coalesce_gap=_int(table, "coalesce_gap", minimum=0),
            max_request_bytes=_int(table, "max_request_bytes", minimum=1),
        )

    def plain_http(self, host: str) -> bool:
        """True when ``host`` (``host[:port]``) is reached over plain HTTP.

        Loopback hosts always are; others only when listed in ``insecure``.
        """
        return _is_loopback(host) or host.lower() in self.insecure

    def endpoints(self, host: str) -> list[Endpoint]:
        """Where to send requests for registry ``host``: its mirrors in order, then the origin.

        ``host`` is normalised first (``docker.io`` -> ``registry-1.docker.io``); the
        origin's scheme is ``http`` when :meth:`plain_http` says so, else ``https``.
        Raises InvalidArgument for a malformed host.
        """
        origin = normalize_host(host)
        scheme = "http" if self.plain_http(origin) else "https"
        return [*self.mirrors.get(origin, ()), Endpoint(scheme=scheme, host=origin)]


def _is_loopback(host: str) -> bool:
    name = _strip_port(host.lower())
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _host_key(key: str, host: object) -> str:
    if not isinstance(host, str):
        raise ConfigError(f"registry.{key}: hosts must be strings")
    try:
        return normalize_host(host)
    except InvalidArgument as exc:
        raise ConfigError(f"registry.{key}: {exc}") from None


def _mirrors(value: object) -> Mapping[str, tuple[Endpoint, ...]]:
    if not isinstance(value, Mapping):
        raise ConfigError("registry.mirrors: want a table of host = [endpoint URLs]")
    result: dict[str, tuple[Endpoint, ...]] = {}
    for host, urls in value.items():
        key = _host_key("mirrors", host)
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ConfigError(f"registry.mirrors.{host}: want a list of URL strings")
        result[key] = tuple(_mirror_endpoint(key, url) for url in urls)
    return MappingProxyType(result)


def _mirror_endpoint(host: str, url: str) -> Endpoint:
    parts = urlsplit(url)
    # The URL is not echoed: it could carry user info.
    where = f"registry.mirrors.{host}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: mirror endpoints must be http:// or https:// URLs")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}: mirror URLs must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: mirror URLs must not have a path or query")
    try:
        netloc = normalize_host(parts.netloc)
    except InvalidArgument as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Endpoint(scheme=parts.scheme, host=netloc, is_mirror=True)


def _str(table: Mapping[str, Any], key: str) -> str:
    value = table.get(key, DEFAULTS[key])
    if not isinstance(value, str):
        raise ConfigError(f"registry.{key}: want a string")
    return value


def _str_list(table: Mapping[str, Any], key: str) -> list[str]:
    value = table.get(key, DEFAULTS[key])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"registry.{key}: want a list of strings")
    return list(value)


def _seconds(table: Mapping[str, Any], key: str) -> float:
    value = table.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"registry.{key}: want a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"registry.{key}: want a positive number of seconds")
    return float(value)


def _int(table: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = table.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"registry.{key}: want an integer")
    if value < minimum:
        raise ConfigError(f"registry.{key}: want an integer >= {minimum}")
    return value


def _bool(table: Mapping[str, Any], key: str) -> bool:
    value = table.get(key, DEFAULTS[key])
    if not isinstance(value, bool):
        raise ConfigError(f"registry.{key}: want true or false")
    return value
