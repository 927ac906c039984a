"""The ``/metrics`` HTTP endpoint, served on the snapshotter's event loop.

``MetricsEndpoint.start`` returns once the address accepts connections; ``aclose`` stops
it (idempotent). Each ``GET /metrics`` first refreshes the scrape-time figures
(``Metrics.refresh``: the daemons are asked concurrently, each within a short timeout),
then renders the registry in the format the scraper asked for (Prometheus text or
OpenMetrics, by ``Accept``). Rendering happens on the loop, right after the refresh and
without awaiting in between, so concurrent scrapes cannot mix their readings.

The endpoint is on the loop (not in prometheus_client's own thread) because the figures it
reads (the daemon table) belong to the loop.
"""

from __future__ import annotations

import ipaddress
import logging

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from snapshotter.errdefs import StartupError
from snapshotter.metrics.families import Metrics

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); StartupError if malformed.

    An empty host means every interface.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise StartupError(f"metrics.address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise StartupError(f"metrics.address {address!r}: bad IPv6 address") from None
    elif ":" in host:
        raise StartupError(f"metrics.address {address!r}: write an IPv6 host as [host]")
    return host, int(port_text)


class MetricsEndpoint:
    """Serves ``metrics`` at ``http://<address>/metrics``; see the module docstring."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        self.metrics = metrics
        self.address = address
        self._host, self._port = parse_address(address)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; raises StartupError when the address cannot be bound."""
        app = web.Application()
        app.add_routes([web.get("/metrics", self._metrics), web.get("/", self._index)])
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host or None, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(
                f"metrics endpoint cannot listen on {self.address}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        log.info("metrics on http://%s/metrics", self.address)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every bound socket (the real port when 0 was asked for)."""
        runner = self._runner
        return [(str(a[0]), int(a[1])) for a in runner.addresses] if runner is not None else []

    async def aclose(self) -> None:
        """Stop listening and finish in-flight scrapes (bounded); idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.metrics.refresh()
        # Rendered at once, with no await after the refresh: see the module docstring.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encode(self.metrics.registry),
                                headers={"Content-Type": content_type})
        response.enable_compression()
        return response

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="lazysnap: metrics at /metrics\n")
