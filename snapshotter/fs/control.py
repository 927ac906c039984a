"""The FUSE daemon's control socket: HTTP/1.1 with JSON bodies over a unix socket.

Protocol, version 1 (server: ``ControlServer``, client: ``ControlClient``)::

    GET    /v1/status                          200 DaemonStatus
    POST   /v1/layers           body LayerSpec  201 LayerStatus
    DELETE /v1/layers/{id}                     200 {}
    GET    /v1/layers/{id}/ready?timeout=S     200 LayerStatus   (long poll, see below)
    POST   /v1/shutdown                        202 {}            (the daemon then exits)

Errors are ``{"error": {"code": CODE, "message": TEXT}}`` with these codes and statuses:
``invalid_argument`` 400, ``not_found`` 404, ``already_exists`` 409,
``failed_precondition`` 409, ``layer_failed`` 409 (the layer could not be mounted; the
message is the reason), ``timeout`` 504 (the ready wait ran out), ``unavailable`` 503 (the
daemon is stopping), ``internal`` 500.

``/ready`` answers as soon as the layer is mounted and its prefetch has finished (or
given up: prefetch only warms the cache), or it failed, or ``timeout`` seconds passed; the
server waits on an event, and the client on the open request, so nobody polls.

The JSON of ``LayerSpec``, ``LayerStatus`` and ``DaemonStatus`` is their field names with
plain JSON values (``to_json``/``from_json``); unknown keys in a ``LayerSpec`` are refused.
The socket is created with mode 0600; a stale socket file at the path is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from snapshotter.errdefs import (
    AlreadyExists,
    DaemonError,
    FailedPrecondition,
    InvalidArgument,
    LazysnapError,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)

FORMATS = ("estargz", "rafs-v5", "rafs-v6")
BOOTSTRAP_FORMATS = ("rafs-v5", "rafs-v6")


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """What the manager asks a daemon to mount.

    ``toc_digest`` None means "no TOC digest label"; the layer is then refused unless
    ``skip_verify``. ``prefetch_timeout_s <= 0`` disables prefetch.
    ``background_rate_bytes_per_s`` 0 means unpaced. ``readahead_chunks`` 0 disables
    read-ahead. ``bootstrap`` (RAFS formats only): the absolute path of the nydus
    bootstrap to serve; ``toc_digest`` is then the bootstrap's digest, ``digest`` the
    bootstrap layer's, and the chunks are read from ``sha256:<blob id>`` blobs of ``ref``.
    ``background_silence_s``: seconds without on-demand fetches the background fetch waits
    for (0 = none); ``activity_file``: the absolute path through which daemons share that
    activity (None: this daemon's layers only); see ``snapshotter.fs.read.activity``.
    ``toc_file`` (eStargz only): the absolute path of the layer's TOC JSON, already fetched
    and checked by the snapshotter, with ``blob_size`` and ``toc_offset`` (where the TOC
    member starts); the daemon then mounts without a request to the registry, still
    verifying the file against ``toc_digest``, and fetches footer and TOC itself when the
    file is missing or does not verify. ``amplify_bytes``: how far past a miss the same
    request reads uncached chunks of the blob (0 = only what was asked; see
    ``snapshotter.fs.read.reader``). ``whole_file_bytes``: the smallest file kept whole in
    the cache once read to its end (0 = none; see ``snapshotter.fs.read.reader``).
    ``dir_ahead_bytes``/``dir_ahead_file_bytes``: directory read-ahead budget and the
    largest compressed file it counts as small (0 = off; see ``snapshotter.fs.read.dirahead``).
    """

    layer_id: int
    ref: str
    digest: str
    toc_digest: str | None = None
    skip_verify: bool = False
    format: str = "estargz"
    prefetch_timeout_s: float = 10.0
    background_fetch: bool = False
    background_rate_bytes_per_s: int = 0
    readahead_chunks: int = 4
    bootstrap: str | None = None
    background_silence_s: float = 0.0
    activity_file: str | None = None
    toc_file: str | None = None
    blob_size: int | None = None
    toc_offset: int | None = None
    amplify_bytes: int = 0
    whole_file_bytes: int = 0
    dir_ahead_bytes: int = 0
    dir_ahead_file_bytes: int = 64 << 10

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> LayerSpec:
        """Parse and validate; raises InvalidArgument for unknown keys or bad values."""
        if not isinstance(raw, dict):
            raise InvalidArgument("layer spec must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise InvalidArgument(f"unknown layer spec keys: {sorted(unknown)}")
        get = json_field
        spec = cls(
            layer_id=get(raw, "layer_id", int),
            ref=get(raw, "ref", str),
            digest=get(raw, "digest", str),
            toc_digest=get(raw, "toc_digest", str, None, allow_none=True),
            skip_verify=get(raw, "skip_verify", bool, False),
            format=get(raw, "format", str, "estargz"),
            prefetch_timeout_s=float(get(raw, "prefetch_timeout_s", (int, float), 10.0)),
            background_fetch=get(raw, "background_fetch", bool, False),
            background_rate_bytes_per_s=get(raw, "background_rate_bytes_per_s", int, 0),
            readahead_chunks=get(raw, "readahead_chunks", int, 4),
            bootstrap=get(raw, "bootstrap", str, None, allow_none=True),
            background_silence_s=float(
                get(raw, "background_silence_s", (int, float), 0.0)),
            activity_file=get(raw, "activity_file", str, None, allow_none=True),
            toc_file=get(raw, "toc_file", str, None, allow_none=True),
            blob_size=get(raw, "blob_size", int, None, allow_none=True),
            toc_offset=get(raw, "toc_offset", int, None, allow_none=True),
            amplify_bytes=get(raw, "amplify_bytes", int, 0),
            whole_file_bytes=get(raw, "whole_file_bytes", int, 0),
            dir_ahead_bytes=get(raw, "dir_ahead_bytes", int, 0),
            dir_ahead_file_bytes=get(raw, "dir_ahead_file_bytes", int, 64 << 10),
        )
        spec.check()
        return spec

    def check(self) -> None:
        """Raise InvalidArgument for values no daemon could serve."""
        if self.layer_id < 0:
            raise InvalidArgument(f"layer_id must be >= 0, got {self.layer_id}")
        if not self.ref or not self.digest.startswith("sha256:"):
            raise InvalidArgument("layer spec needs a ref and a sha256 digest")
        if self.format not in FORMATS:
            raise InvalidArgument(f"unsupported layer format {self.format!r}")
        if (self.background_rate_bytes_per_s < 0 or self.readahead_chunks < 0
                or self.background_silence_s < 0 or self.amplify_bytes < 0
                or self.whole_file_bytes < 0 or self.dir_ahead_bytes < 0
                or self.dir_ahead_file_bytes <= 0):
            raise InvalidArgument("rates, read-ahead and silence must not be negative")
        if self.activity_file is not None and not os.path.isabs(self.activity_file):
            raise InvalidArgument("the activity file path must be absolute")
        if self.toc_file is not None:
            if self.format != "estargz" or not os.path.isabs(self.toc_file):
                raise InvalidArgument("a TOC file path must be absolute, for an eStargz layer")
            if (self.blob_size is None or self.toc_offset is None
                    or not 0 <= self.toc_offset < self.blob_size):
                raise InvalidArgument("a TOC file needs blob_size and a toc_offset inside it")
        if self.bootstrap is not None and (self.format not in BOOTSTRAP_FORMATS
                                           or not os.path.isabs(self.bootstrap)):
            raise InvalidArgument("a bootstrap path must be absolute, for a RAFS layer")


def json_field(
    raw: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    *default: Any,
    error: type[LazysnapError] = InvalidArgument,
    allow_none: bool = False,
    what: str = "layer spec",
) -> Any:
    """``raw[key]`` checked to be a ``kind`` (a bool never passes for an int), or
    ``default[0]`` when the key is absent. Raises ``error`` for a missing key without a
    default or a value of the wrong type (``None`` passes only with ``allow_none``)."""
    if key not in raw:
        if not default:
            raise error(f"{what} lacks {key!r}")
        return default[0]
    value = raw[key]
    if value is None and allow_none:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise error(f"{what} key {key!r} has the wrong type")
    return value


@dataclass(frozen=True, slots=True)
class LayerStatus:
    """One layer as the daemon sees it.

    ``ready``: mounted and prefetch finished (or gave up). ``error``: why the layer could
    not be mounted (then it is not served). ``fetched_bytes``: compressed bytes fetched
    from the registry for this layer; ``total_bytes``: compressed blob size (0 until the
    layer is opened). ``fully_fetched``: the background fetch completed.
    """

    layer_id: int
    digest: str
    ready: bool
    error: str | None
    fetched_bytes: int
    total_bytes: int
    fully_fetched: bool
    prefetch_done: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LayerStatus:
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """The daemon: ``state`` is ``starting``, ``running`` or ``stopping``; ``mode`` is
    ``dedicated`` or ``shared``; ``cache`` and ``reader`` are counter dictionaries (the
    chunk cache's ``CacheStats`` and the sum of the layers' ``ReaderCounters``);
    ``counters`` is ``snapshotter.metrics.counters.DaemonCounters.to_json()`` (FUSE
    requests, prefetch and background fetch, registry requests) for the metrics endpoint.

    ``from_json`` fills fields with defaults that the JSON lacks (a daemon started by an
    older lazysnap and re-attached); a missing required field raises KeyError.
    """

    state: str
    pid: int
    mode: str
    mountpoint: str
    layers: list[LayerStatus]
    cache: dict[str, int] = field(default_factory=dict)
    reader: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0
    counters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [layer.to_json() for layer in self.layers]
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DaemonStatus:
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw or _required(f)}
        values["layers"] = [LayerStatus.from_json(x) for x in raw["layers"]]
        return cls(**values)


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


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

_ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidArgument, 400, "invalid_argument"),
    (NotFound, 404, "not_found"),
    (AlreadyExists, 409, "already_exists"),
    (FailedPrecondition, 409, "failed_precondition"),
    (DaemonError, 409, "layer_failed"),
    (TimeoutError, 504, "timeout"),
    (Unavailable, 503, "unavailable"),
)
_CLIENT_ERRORS: Mapping[str, type[LazysnapError]] = {
    "invalid_argument": InvalidArgument,
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "failed_precondition": FailedPrecondition,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(exc: BaseException) -> web.Response:
    matches = [(status, code) for kind, status, code in _ERRORS if isinstance(exc, kind)]
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
                web.get("/v1/status", self._status),
                web.post("/v1/layers", self._add),
                web.delete("/v1/layers/{id}", self._remove),
                web.get("/v1/layers/{id}/ready", self._ready),
                web.post("/v1/shutdown", self._shutdown),
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


# --- client --------------------------------------------------------------------------------


class ControlClient:
    """Talks to one daemon's control socket. Stateless: one connection per call.

    Failure modes: the daemon's errors come back typed (InvalidArgument, NotFound,
    AlreadyExists, FailedPrecondition; everything else, including a failed layer, a
    ready timeout and a daemon that is stopping, as DaemonError with the daemon's
    message); an unreachable socket or broken connection is DaemonError.
    """

    def __init__(self, socket_path: str, *, request_timeout_s: float = 30.0) -> None:
        self._path = socket_path
        self._timeout = request_timeout_s

    async def status(self) -> DaemonStatus:
        return DaemonStatus.from_json(await self._call("GET", "/v1/status"))

    async def add_layer(self, spec: LayerSpec | Mapping[str, Any]) -> LayerStatus:
        """Ask the daemon to mount ``spec`` (a LayerSpec or its JSON object); returns at
        once (use ``wait_ready``). The daemon validates a JSON object like ``from_json``."""
        body = spec.to_json() if isinstance(spec, LayerSpec) else dict(spec)
        return LayerStatus.from_json(await self._call("POST", "/v1/layers", body))

    async def remove_layer(self, layer_id: int) -> None:
        await self._call("DELETE", f"/v1/layers/{layer_id}")

    async def wait_ready(self, layer_id: int, timeout: float) -> LayerStatus:
        """Return once the layer is ready; DaemonError if it failed or ``timeout`` passed."""
        path = f"/v1/layers/{layer_id}/ready?timeout={timeout}"
        return LayerStatus.from_json(await self._call("GET", path, total_s=timeout + self._timeout))

    async def shutdown(self) -> None:
        """Ask the daemon to unmount and exit; returns when the request is accepted."""
        await self._call("POST", "/v1/shutdown")

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
            raise _CLIENT_ERRORS.get(code, DaemonError)(message)
        return data
