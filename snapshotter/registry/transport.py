"""One HTTP exchange with a registry or its blob storage, with auth, redirects and counters.

:class:`Transport` owns the aiohttp session (created lazily inside the running loop from
an injectable factory), the :class:`~snapshotter.registry.auth.Authenticator`, and the
:class:`RegistryStats` counters. It maps every transport failure and status to the typed
errors of ``snapshotter.errdefs`` exactly once, here, where the HTTP call is made:

* connection errors and broken bodies -> ``RegistryUnavailable``; timeouts (connect or the
  per-request total) -> ``RegistryTimeout``;
* HTTP statuses are left to the caller (:func:`snapshotter.registry.retry.error_for_status`),
  except a 401 that survives the authentication flow -> ``RegistryAuthError``.

Retrying is *not* done here; callers wrap whole operations in a RetryPolicy. Bodies are read
only for 2xx answers and only up to a caller-chosen limit (a registry that ignores ``Range``
must not make us download a whole layer). Messages name method, host and path, never a
query string (signed storage URLs) or any header value.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from snapshotter.errdefs import (
    FailedPrecondition,
    RegistryAuthError,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
)
from snapshotter.registry.auth import MAX_TOKEN_RESPONSE, Authenticator, CredentialStore
from snapshotter.registry.hosts import Endpoint, HostsConfig

log = logging.getLogger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
USER_AGENT = "lazysnap/0.1"
_READ_CHUNK = 1 << 20

SessionFactory = Callable[[], aiohttp.ClientSession]
BodyLimit = Callable[[int, Mapping[str, str]], int]
"""Given a 2xx status and the response headers, how many body bytes to read (0: none)."""


@dataclass
class RegistryStats:
    """Counters for a metrics layer to read; every key comes from a small fixed set.

    ``requests`` by (kind, status class) with kinds ``manifest``, ``blob_head``,
    ``blob_range``, ``blob_multirange``, ``token`` and classes ``2xx``..``5xx`` or
    ``error`` (no HTTP answer); ``errors`` by error class name of failed operations.
    """

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_received: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    redirects: int = 0
    mirror_fallbacks: int = 0
    multi_range_fallbacks: int = 0
    redirect_reresolves: int = 0

    def count_request(self, kind: str, status: int | None) -> None:
        """Count one HTTP exchange (``status`` None when no answer came)."""
        label = "error" if status is None else f"{min(max(status // 100, 1), 5)}xx"
        self.requests[(kind, label)] += 1

    def count_error(self, exc: BaseException) -> None:
        """Count one failed operation by the class of its error."""
        self.errors[type(exc).__name__] += 1


@dataclass(frozen=True)
class HttpResponse:
    """A finished exchange: status, headers, the (possibly partial) body read, final URL.

    ``redirected`` is True when redirects led to another origin (a storage host).
    """

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    url: URL
    redirected: bool = False


def authority(url: URL) -> str:
    """``host[:port]`` of a URL as written in configs (IPv6 bracketed, default port kept off)."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{url.explicit_port}" if url.explicit_port is not None else host


def redact(url: URL) -> str:
    """``scheme://host[:port]/path`` with no user info, query or fragment."""
    return f"{url.scheme}://{authority(url)}{url.raw_path}"


_QUERY_RE = re.compile(r"\?\S*")


def _describe(exc: BaseException) -> str:
    """A short, query-free description of a transport exception."""
    text = _QUERY_RE.sub("?...", str(exc))[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _with_auth(headers: Mapping[str, str], authorization: str | None) -> dict[str, str]:
    merged = dict(headers)
    if authorization is not None:
        merged["Authorization"] = authorization
    return merged


_tls: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """The TLS context of every https exchange: the system's CA store, hostname checks and
    ALPN ``http/1.1``, like aiohttp's default (``ssl=True``). Built on first use, with the
    environment of that moment (``SSL_CERT_FILE``, ``SSL_CERT_DIR``), and kept: parsing
    the CA bundle costs about 1 MiB and some milliseconds, which a client that only talks
    plain HTTP (or a FUSE daemon that has not fetched yet) never pays. Passing it per
    request also frees us from aiohttp's import-time contexts (see
    ``snapshotter.fs.__main__.import_runtime``)."""
    global _tls
    if _tls is None:
        context = ssl.create_default_context()
        context.set_alpn_protocols(("http/1.1",))
        _tls = context
    return _tls


def _default_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        auto_decompress=False, headers={"User-Agent": USER_AGENT}, trust_env=False
    )


class Transport:
    """HTTP exchanges for one RegistryClient; see the module docstring.

    ``aclose()`` closes the session it created (idempotent); afterwards every call raises
    ``FailedPrecondition``.
    """

    def __init__(
        self,
        hosts: HostsConfig,
        credentials: CredentialStore,
        stats: RegistryStats,
        *,
        session_factory: SessionFactory | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._hosts = hosts
        self._stats = stats
        self._factory = session_factory or _default_session
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._timeout = aiohttp.ClientTimeout(
            total=hosts.request_timeout, sock_connect=hosts.connect_timeout
        )
        kwargs = {"clock": clock} if clock is not None else {}
        self.auth = Authenticator(
            credentials, self._token_fetch, plain_http_ok=hosts.plain_http, **kwargs
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise FailedPrecondition("the registry client is closed")
        if self._session is None:
            self._session = self._factory()
        return self._session

    async def aclose(self) -> None:
        """Close the HTTP session; idempotent."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(
        self,
        kind: str,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        body_limit: BodyLimit,
        form: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """One request, redirects not followed; reads at most ``body_limit(status)`` bytes
        of a 2xx body. Raises RegistryTimeout / RegistryUnavailable for transport failures,
        RegistryError for a compressed body (we always ask for ``identity``)."""
        session = self._get_session()
        what = f"{method} {redact(url)}"
        try:
            async with session.request(
                method,
                url,
                headers={"Accept-Encoding": "identity", **headers},
                data=dict(form) if form is not None else None,
                allow_redirects=False,
                timeout=self._timeout,
                ssl=tls_context() if url.scheme == "https" else True,
            ) as resp:
                body = b""
                if 200 <= resp.status < 300 and method != "HEAD":
                    _check_encoding(resp, what)
                    body = await _read(resp, body_limit(resp.status, resp.headers))
                self._stats.count_request(kind, resp.status)
                self._stats.bytes_received += len(body)
                return HttpResponse(resp.status, resp.headers, body, resp.url)
        except TimeoutError:
            self._stats.count_request(kind, None)
            raise RegistryTimeout(f"{what}: timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            self._stats.count_request(kind, None)
            raise RegistryUnavailable(f"{what}: {_describe(exc)}") from None

    async def registry_request(
        self,
        kind: str,
        method: str,
        endpoint: Endpoint,
        repository: str,
        path: str,
        headers: Mapping[str, str],
        body_limit: BodyLimit,
        *,
        namespace: str | None = None,
    ) -> HttpResponse:
        """A ``/v2/<repository>/<path>`` request with authentication and redirects.

        Sends a cached/known ``Authorization`` up front; on 401 runs the challenge flow and
        retries once (a second 401 raises RegistryAuthError). Redirects are followed (at
        most MAX_REDIRECTS), dropping ``Authorization`` when the origin changes and refusing
        an https -> http downgrade to a host not allowed plain HTTP. ``namespace`` adds the
        ``ns=<host>`` query containerd sends to mirrors. Other statuses are returned.
        """
        url = URL.build(
            scheme=endpoint.scheme, authority=endpoint.host, path=f"/v2/{repository}/{path}"
        )
        if endpoint.is_mirror and namespace:
            url = url.with_query({"ns": namespace})
        scope = f"repository:{repository}:pull"
        sent = await self.auth.authorization(endpoint.host, scope)
        resp = await self.send(kind, method, url, _with_auth(headers, sent), body_limit)
        if resp.status == 401:
            challenges = resp.headers.getall("WWW-Authenticate", [])
            sent = await self.auth.on_unauthorized(endpoint.host, scope, challenges, sent)
            resp = await self.send(kind, method, url, _with_auth(headers, sent), body_limit)
            if resp.status == 401:
                raise RegistryAuthError(f"{method} {redact(url)}: credentials refused")
        if resp.status in REDIRECT_STATUSES:
            resp = await self._follow(kind, method, resp, headers, sent, body_limit)
        return resp

    async def _follow(
        self,
        kind: str,
        method: str,
        resp: HttpResponse,
        headers: Mapping[str, str],
        authorization: str | None,
        body_limit: BodyLimit,
    ) -> HttpResponse:
        origin = resp.url.origin()
        for _ in range(MAX_REDIRECTS):
            what = f"{method} {redact(resp.url)}"
            location = resp.headers.get("Location")
            if not location:
                raise RegistryError(f"{what}: HTTP {resp.status} without a Location")
            try:
                target = resp.url.join(URL(location, encoded=True))
            except ValueError:
                raise RegistryError(f"{what}: unusable redirect Location") from None
            if target.scheme not in ("http", "https") or not target.raw_host:
                raise RegistryError(f"{what}: redirect to an unsupported URL")
            if (
                resp.url.scheme == "https"
                and target.scheme == "http"
                and not self._hosts.plain_http(authority(target))
            ):
                raise RegistryError(f"{what}: refusing a redirect from https to http")
            if resp.status == 303 and method != "HEAD":
                method = "GET"
            self._stats.redirects += 1
            same_origin = target.origin() == origin
            # Never forward registry credentials to another host (signed storage URLs).
            forwarded = authorization if same_origin else None
            resp = await self.send(kind, method, target, _with_auth(headers, forwarded), body_limit)
            if resp.status not in REDIRECT_STATUSES:
                return replace(resp, redirected=not same_origin)
        raise RegistryError(f"{method} {redact(resp.url)}: more than {MAX_REDIRECTS} redirects")

    async def _token_fetch(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        form: Mapping[str, str] | None,
    ) -> tuple[int, bytes]:
        try:
            target = URL(url, encoded=True)
        except ValueError:
            raise RegistryAuthError("unusable token realm URL") from None
        resp = await self.send(
            "token", method, target, headers, lambda *_: MAX_TOKEN_RESPONSE, form=form
        )
        return resp.status, resp.body


def _check_encoding(resp: aiohttp.ClientResponse, what: str) -> None:
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RegistryError(f"{what}: unexpected Content-Encoding {encoding[:20]!r}")


async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read up to ``limit`` body bytes; drop the connection if more remain unread."""
    data = bytearray()
    while len(data) < limit:
        chunk = await resp.content.read(min(_READ_CHUNK, limit - len(data)))
        if not chunk:
            break
        data += chunk
    if not resp.content.at_eof():
        resp.close()
    return bytes(data)
