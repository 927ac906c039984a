"""An in-process OCI registry (and blob storage) for tests, with fault injection.

Not used in production. It serves just the read side of the distribution API that
lazysnap uses (``/v2/``, manifests and blobs with GET/HEAD and ``Range``), on
``127.0.0.1:<free port>`` via aiohttp's server, and can misbehave on demand:

* ``auth``: ``"none"``, ``"basic"`` (``users``) or ``"bearer"`` (token endpoint at
  ``/token``, optionally requiring ``users`` as Basic credentials there);
* ``multi_range``: ``"multipart"`` (like Go's ``http.ServeContent``), ``"refuse"`` (400),
  ``"ignore"`` (200 with the whole blob), ``"first"`` (206 with only the first range);
  ``ignore_range`` makes every range request a 200;
* ``faults``: a queue consumed by blob and manifest requests: an int status to answer
  with, ``"drop"`` (start the normal answer, close the connection mid-body) or ``"hang"``
  (never answer);
* ``storage``: a :class:`FakeStorage` to redirect blob requests to (307, signed URL);
* ``head_status`` (registry and storage): force HEAD on blobs to answer this status.

Every request is recorded (method, path, query, headers) for assertions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from snapshotter.registry import ranges as rng

FAKE_SERVICE = "fake-registry"
_BOUNDARY = "fake0boundary0b5e"


@dataclass(frozen=True)
class Recorded:
    """One request as the fake server saw it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]


@dataclass
class _Server:
    """Common plumbing: an aiohttp app on 127.0.0.1:0, request log, faults, shutdown."""

    requests: list[Recorded] = field(default_factory=list)
    faults: list[int | str] = field(default_factory=list)
    multi_range: str = "multipart"
    ignore_range: bool = False
    head_status: int | None = None
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)
    _port: int = field(default=0, init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>`` once started."""
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def _start(self, app: web.Application) -> None:
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        """Release hanging handlers and stop the server; idempotent."""
        self._stop.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
            )
        )
        return await handler(request)

    async def _fault(self, request: web.Request, data: bytes) -> web.StreamResponse | None:
        """Apply the next queued fault, if any: a response to send, or None to go on."""
        if not self.faults:
            return None
        fault = self.faults.pop(0)
        if isinstance(fault, int):
            return web.Response(status=fault)
        if fault == "hang":
            await self._stop.wait()
            return web.Response(status=503)
        # "drop": start the normal answer, then close the connection half-way through it.
        normal = self._serve(request, data, {})
        body = normal.body if isinstance(normal.body, bytes) else b""
        resp = web.StreamResponse(status=normal.status, headers=normal.headers)
        resp.content_length = len(body) + 2
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2 + 1])
        assert request.transport is not None
        request.transport.close()
        return resp

    def _serve(self, request: web.Request, data: bytes, headers: Mapping[str, str]) -> web.Response:
        """Answer GET/HEAD for ``data`` honouring Range per the configured behaviour."""
        base = {"Accept-Ranges": "bytes", **headers}
        size = len(data)
        if request.method == "HEAD":
            return web.Response(status=200, headers={**base, "Content-Length": str(size)})
        header = request.headers.get("Range")
        if header is None or self.ignore_range:
            return web.Response(status=200, body=data, headers=base)
        try:
            wanted = rng.parse_range_header(header, size)
        except rng.RangeFormatError:
            return web.Response(status=200, body=data, headers=base)
        if not wanted:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        if len(wanted) > 1 and self.multi_range != "multipart":
            if self.multi_range == "refuse":
                return web.Response(status=400)
            if self.multi_range == "ignore":
                return web.Response(status=200, body=data, headers=base)
            wanted = wanted[:1]
        if len(wanted) == 1:
            (start, end) = wanted[0]
            content_range = rng.format_content_range((start, end), size)
            return web.Response(
                status=206, body=data[start:end], headers={**base, "Content-Range": content_range}
            )
        parts = [((s, e), data[s:e]) for s, e in wanted]
        body = rng.encode_multipart_byteranges(parts, size, _BOUNDARY)
        content_type = f"multipart/byteranges; boundary={_BOUNDARY}"
        return web.Response(status=206, body=body, headers={**base, "Content-Type": content_type})


@dataclass
class FakeStorage(_Server):
    """Blob storage behind redirects: ``/objects/<digest>?sig=<generation>``.

    Answers 403 for a signature of an older generation (see :meth:`expire_signatures`).
    """

    blobs: dict[str, bytes] = field(default_factory=dict)
    generation: int = 0

    async def start(self) -> FakeStorage:
        app = web.Application()
        app.router.add_route("GET", "/objects/{digest}", self._object)
        app.router.add_route("HEAD", "/objects/{digest}", self._object)
        await self._start(app)
        return self

    def signed_url(self, digest: str) -> str:
        return f"{self.url}/objects/{digest}?sig={self.generation}&X-Secret=s3cr3t"

    def expire_signatures(self) -> None:
        """Invalidate every URL handed out so far."""
        self.generation += 1

    async def _object(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.Response(status=404)
        if request.query.get("sig") != str(self.generation):
            return web.Response(status=403)
        if request.method == "HEAD" and self.head_status is not None:
            return web.Response(status=self.head_status)
        fault = await self._fault(request, data)
        return fault if fault is not None else self._serve(request, data, {})


@dataclass
class FakeRegistry(_Server):
    """The registry API; see the module docstring for the knobs."""

    auth: str = "none"
    users: dict[str, str] = field(default_factory=dict)
    token_lifetime: int | None = 300
    token_field: str = "token"
    storage: FakeStorage | None = None
    wrong_digest_header: bool = False
    blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    valid_tokens: set[str] = field(default_factory=set)
    _token_ids: itertools.count[int] = field(default_factory=itertools.count, init=False)

    async def start(self) -> FakeRegistry:
        app = web.Application()
        app.router.add_route("GET", "/token", self._token)
        app.router.add_route("GET", "/v2/", self._base)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{reference}", self._manifest)
        await self._start(app)
        return self

    def put_blob(self, repository: str, data: bytes) -> str:
        """Store a blob; return its digest (also copied to the storage, if any)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[(repository, digest)] = data
        if self.storage is not None:
            self.storage.blobs[digest] = data
        return digest

    def put_manifest(self, repository: str, tag: str | None, body: bytes, media_type: str) -> str:
        """Store a manifest under its digest and ``tag``; return the digest."""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[(repository, digest)] = (media_type, body)
        if tag is not None:
            self.manifests[(repository, tag)] = (media_type, body)
        return digest

    def revoke_tokens(self) -> None:
        """Make every issued bearer token invalid."""
        self.valid_tokens.clear()

    def _authorized(self, request: web.Request, repository: str) -> web.Response | None:
        """None if the request may proceed, else the 401 to send."""
        sent = request.headers.get("Authorization", "")
        if self.auth == "basic":
            if sent in {_basic(u, p) for u, p in self.users.items()}:
                return None
            challenge = 'Basic realm="fake"'
        elif self.auth == "bearer":
            if sent.startswith("Bearer ") and sent[7:] in self.valid_tokens:
                return None
            challenge = (
                f'Bearer realm="{self.url}/token",service="{FAKE_SERVICE}",'
                f'scope="repository:{repository}:pull"'
            )
        else:
            return None
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    async def _token(self, request: web.Request) -> web.Response:
        if self.users and request.headers.get("Authorization", "") not in {
            _basic(u, p) for u, p in self.users.items()
        }:
            return web.Response(status=401)
        token = f"tok-{next(self._token_ids)}-secret"
        self.valid_tokens.add(token)
        answer: dict[str, object] = {self.token_field: token}
        if self.token_lifetime is not None:
            answer["expires_in"] = self.token_lifetime
        return web.json_response(answer)

    async def _base(self, request: web.Request) -> web.Response:
        refused = self._authorized(request, "")
        return refused if refused is not None else web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        repository, digest = request.match_info["name"], request.match_info["digest"]
        refused = self._authorized(request, repository)
        if refused is not None:
            return refused
        data = self.blobs.get((repository, digest))
        fault = await self._fault(request, data or b"")
        if fault is not None:
            return fault
        if data is None:
            return web.Response(status=404)
        if request.method == "HEAD" and self.head_status is not None:
            return web.Response(status=self.head_status)
        if self.storage is not None:
            location = self.storage.signed_url(digest)
            return web.Response(status=307, headers={"Location": location})
        return self._serve(request, data, {"Docker-Content-Digest": digest})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        repository = request.match_info["name"]
        refused = self._authorized(request, repository)
        if refused is not None:
            return refused
        stored = self.manifests.get((repository, request.match_info["reference"]))
        fault = await self._fault(request, stored[1] if stored else b"")
        if fault is not None:
            return fault
        if stored is None:
            return web.Response(status=404)
        media_type, body = stored
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if self.wrong_digest_header:
            digest = "sha256:" + "0" * 64
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        return web.Response(status=200, body=body, headers=headers)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
