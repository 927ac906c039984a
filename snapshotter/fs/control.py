"""The FUSE daemon's control socket server (protocol: ``snapshotter.daemonapi.protocol``).

``ControlServer`` serves a ``DaemonCore`` (``fs.layers.LayerManager``). The socket is
created with mode 0600; a stale socket file at the path is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from snapshotter.daemonapi import protocol
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.daemonapi.status import DaemonStatus, LayerStatus
from snapshotter.errdefs import InvalidArgument

log = logging.getLogger(__name__)


class DaemonCore(Protocol):
    """What the control server needs from the daemon (``daemon.LayerManager``)."""

    def status(self) -> DaemonStatus: ...

    async def add_layer(self, spec: LayerSpec) -> LayerStatus:
        """Start mounting; raises AlreadyExists, FailedPrecondition, InvalidArgument."""
        ...

    async def remove_layer(self, layer_id: int) -> None:
        """Stop serving a layer; raises NotFound."""
        ...

    async def wait_ready(self, layer_id: int, timeout: float) -> LayerStatus:
        """Wait for ready; raises NotFound, DaemonError (failed), TimeoutError, Unavailable."""
        ...

    def request_shutdown(self) -> None: ...


# --- server --------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(exc: BaseException) -> web.Response:
    matches = [(status, code) for kind, status, code in protocol.ERRORS if isinstance(exc, kind)]
    if matches:
        status, code = matches[0]
    else:
        log.error("control request failed", exc_info=exc)
        status, code = 500, "internal"
    body = {"error": {"code": code, "message": str(exc) or type(exc).__name__}}
    return web.json_response(body, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        return _error_response(exc)


class ControlServer:
    """Serves ``core`` on ``socket_path`` until ``aclose``.

    With ``sock`` (an already-listening unix socket, e.g. inherited from the manager) the
    server accepts on it instead of binding ``socket_path``.
    """

    def __init__(
        self, core: DaemonCore, socket_path: str, *, sock: socket.socket | None = None
    ) -> None:
        self._core = core
        self._path = socket_path
        self._sock = sock
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and listen; returns when requests are accepted. Raises OSError."""
        app = web.Application(middlewares=[_errors])
        app.add_routes(
            [
                web.get(protocol.STATUS, self._status),
                web.post(protocol.LAYERS, self._add),
                web.delete(protocol.layer_path("{id}"), self._remove),
                web.get(protocol.ready_path("{id}"), self._ready),
                web.post(protocol.SHUTDOWN, self._shutdown),
            ]
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        if self._sock is not None:
            await web.SockSite(runner, self._sock).start()
            return
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self._path).st_mode):
                os.unlink(self._path)
        old_umask = os.umask(0o177)
        try:
            await web.UnixSite(runner, self._path).start()
        finally:
            os.umask(old_umask)

    async def aclose(self) -> None:
        """Stop listening and finish in-flight requests (bounded); idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            if self._sock is None:  # a handed-over socket's path belongs to whoever bound it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._core.status().to_json())

    async def _add(self, request: web.Request) -> web.Response:
        try:
            raw = await request.json()
        except ValueError:
            raise InvalidArgument("request body is not JSON") from None
        status = await self._core.add_layer(LayerSpec.from_json(raw))
        return web.json_response(status.to_json(), status=201)

    async def _remove(self, request: web.Request) -> web.Response:
        await self._core.remove_layer(_layer_id(request))
        return web.json_response({})

    async def _ready(self, request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout", "60"))
        except ValueError:
            raise InvalidArgument("timeout must be a number of seconds") from None
        status = await self._core.wait_ready(_layer_id(request), max(0.0, timeout))
        return web.json_response(status.to_json())

    async def _shutdown(self, request: web.Request) -> web.Response:
        self._core.request_shutdown()
        return web.json_response({}, status=202)


def _layer_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise InvalidArgument("layer id must be an integer") from None
