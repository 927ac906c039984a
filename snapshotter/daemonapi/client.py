"""The typed client of a daemon's control socket (see ``daemonapi.protocol``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from snapshotter.daemonapi import protocol
from snapshotter.daemonapi.reasons import LayerFailed
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.daemonapi.status import DaemonStatus, LayerStatus
from snapshotter.errdefs import DaemonError


class ControlClient:
    """Talks to one daemon's control socket. Stateless: one connection per call.

    Failure modes: the daemon's errors come back typed (InvalidArgument, NotFound,
    AlreadyExists, FailedPrecondition; a layer the daemon could not mount as
    ``LayerFailed`` with the daemon's own reason; everything else, including a ready
    timeout and a daemon that is stopping, as DaemonError with the daemon's message); an
    unreachable socket or broken connection is DaemonError.
    """

    def __init__(self, socket_path: str, *, request_timeout_s: float = 30.0) -> None:
        self._path = socket_path
        self._timeout = request_timeout_s

    async def status(self) -> DaemonStatus:
        return DaemonStatus.from_json(await self._call("GET", protocol.STATUS))

    async def add_layer(self, spec: LayerSpec | Mapping[str, Any]) -> LayerStatus:
        """Ask the daemon to mount ``spec`` (or a JSON object, which the daemon validates
        like ``LayerSpec.from_json``); returns at once (use ``wait_ready``)."""
        body = spec.to_json() if isinstance(spec, LayerSpec) else dict(spec)
        return LayerStatus.from_json(await self._call("POST", protocol.LAYERS, body))

    async def remove_layer(self, layer_id: int) -> None:
        await self._call("DELETE", protocol.layer_path(layer_id))

    async def wait_ready(self, layer_id: int, timeout: float) -> LayerStatus:
        """Return once the layer is ready; LayerFailed if it could not be mounted,
        DaemonError if ``timeout`` passed."""
        path = f"{protocol.ready_path(layer_id)}?timeout={timeout}"
        return LayerStatus.from_json(await self._call("GET", path, total_s=timeout + self._timeout))

    async def shutdown(self) -> None:
        """Ask the daemon to unmount and exit; returns when the request is accepted."""
        await self._call("POST", protocol.SHUTDOWN)

    async def aclose(self) -> None:
        """Nothing to release (one connection per call); present for callers that close."""

    async def _call(
        self, method: str, path: str, body: object = None, total_s: float | None = None
    ) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=total_s or self._timeout)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=self._path), timeout=timeout
                ) as session,
                session.request(method, f"http://lazysnap{path}", json=body) as resp,
            ):
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise DaemonError(
                f"control socket {self._path}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(data, dict):
            raise DaemonError(f"control socket {self._path}: HTTP {status} without a JSON body")
        if status >= 300:
            err = data.get("error") or {}
            code, message = str(err.get("code", "")), str(err.get("message", f"HTTP {status}"))
            if code == "layer_failed":
                raise LayerFailed.parse(message)
            raise protocol.CLIENT_ERRORS.get(code, DaemonError)(message)
        return data
