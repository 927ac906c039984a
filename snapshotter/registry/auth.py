"""Registry credentials and the HTTP authentication flows (Basic and Bearer tokens).

* :class:`CredentialStore` reads a docker ``config.json``: ``auths.<host>.auth`` (base64
  ``user:password``), or ``username``/``password``, and ``identitytoken``. Keys may be bare
  hosts or URLs (``https://index.docker.io/v1/``); Docker Hub aliases all map to
  ``registry-1.docker.io``. Credential helpers (``credsStore``/``credHelpers``) are not
  supported and are ignored.
* :func:`parse_www_authenticate` parses challenges (RFC 7235 §4.1 / RFC 6750 §3), including
  quoted values that contain commas.
* :class:`Authenticator` answers "what ``Authorization`` header for (host, scope)": a
  cached Bearer token until it expires (by an injectable clock), or Basic credentials; and
  after a 401 it runs the token flow (protocol-reference §7.5): ``GET realm?service=&scope=``
  with Basic credentials when known, or the OAuth2 ``POST`` with ``grant_type=refresh_token``
  when an identity token is configured. Responses carry ``token`` or ``access_token`` and an
  optional ``expires_in`` (default 60 s).

Secrets (passwords, identity tokens, bearer tokens, Authorization values) never appear in
log records, exception messages or reprs. Failures raise ``RegistryAuthError`` (refused or
unusable), or the retryable ``RegistryUnavailable`` family when the token endpoint fails
transiently (5xx, 429, connection errors raised by the injected fetch function).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from snapshotter.errdefs import ConfigError, InvalidArgument, RegistryAuthError
from snapshotter.registry.reference import normalize_host
from snapshotter.registry.retry import error_for_status

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token endpoint gives no ``expires_in``."""

MAX_TOKEN_RESPONSE = 1 << 20
CLIENT_ID = "lazysnap"

TokenFetch = Callable[
    [str, str, Mapping[str, str], Mapping[str, str] | None], Awaitable[tuple[int, bytes]]
]
"""``(method, url, headers, form) -> (status, body)``: one HTTP exchange with a token
endpoint; ``form`` (if not None) is sent urlencoded. Raises RegistryUnavailable/Timeout for
transport failures. ``url`` is already encoded."""


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username/password pair and/or an identity (refresh) token. Never printed."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    __str__ = __repr__

    @property
    def has_password(self) -> bool:
        return bool(self.username) and bool(self.password)

    def basic_header(self) -> str:
        """The ``Authorization`` value for HTTP Basic auth."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


class CredentialStore:
    """Credentials by registry host (``host[:port]``, normalised). Immutable."""

    def __init__(self, entries: Mapping[str, Credentials] | None = None) -> None:
        self._entries = {normalize_host(h): c for h, c in (entries or {}).items()}

    def __repr__(self) -> str:
        return f"CredentialStore(hosts={sorted(self._entries)})"

    def get(self, host: str) -> Credentials | None:
        """The credentials for ``host``, or None (anonymous)."""
        try:
            return self._entries.get(normalize_host(host))
        except InvalidArgument:
            return None

    @classmethod
    def from_docker_config(cls, path: str | Path) -> CredentialStore:
        """Load a docker ``config.json``; a missing file means no credentials.

        Raises ConfigError (naming the path, never the content) if the file cannot be
        read or is not a JSON object with a valid ``auths`` table.
        """
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise ConfigError(f"cannot read docker config {path}: {exc.strerror}") from None
        return cls.parse_docker_config(data, source=str(path))

    @classmethod
    def parse_docker_config(cls, data: bytes | str, source: str = "config.json") -> CredentialStore:
        """Parse the text of a docker ``config.json``; ConfigError when malformed."""
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"{source}: not valid JSON") from None
        auths = document.get("auths", {}) if isinstance(document, dict) else None
        if not isinstance(auths, dict):
            raise ConfigError(f"{source}: 'auths' must be an object")
        entries: dict[str, Credentials] = {}
        for key, entry in auths.items():
            host = _config_host(key)
            if host is None or not isinstance(entry, dict):
                log.debug("%s: ignoring an auths entry with an unusable key", source)
                continue
            entries[host] = _entry_credentials(entry, source, host)
        return cls(entries)


def _config_host(key: object) -> str | None:
    """``https://index.docker.io/v1/`` or ``host:port`` -> normalised host, or None."""
    if not isinstance(key, str):
        return None
    netloc = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    try:
        return normalize_host(netloc)
    except InvalidArgument:
        return None


def _entry_credentials(entry: Mapping[str, object], source: str, host: str) -> Credentials:
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    token = entry.get("identitytoken") or ""
    if not all(isinstance(v, str) for v in (username, password, token)):
        raise ConfigError(f"{source}: credentials for {host} must be strings")
    encoded = entry.get("auth") or ""
    if encoded:
        if not isinstance(encoded, str):
            raise ConfigError(f"{source}: 'auth' for {host} must be a string")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, ValueError):
            raise ConfigError(f"{source}: 'auth' for {host} is not base64 user:password") from None
        user, sep, secret = decoded.partition(":")
        if not sep:
            raise ConfigError(f"{source}: 'auth' for {host} is not base64 user:password")
        username, password = user, secret
    assert isinstance(username, str) and isinstance(password, str) and isinstance(token, str)
    return Credentials(username=username, password=password, identity_token=token)


# --- WWW-Authenticate ------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: lower-case ``scheme`` and lower-case-keyed ``params``."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|$))")


def parse_www_authenticate(headers: Iterable[str]) -> list[Challenge]:
    """Parse every challenge in one or more ``WWW-Authenticate`` header values.

    Lenient: a malformed tail is dropped rather than raising, since the caller can only
    act on challenges it understood anyway.
    """
    challenges: list[Challenge] = []
    for header in headers:
        challenges.extend(_ChallengeParser(header).parse())
    return challenges


class _ChallengeParser:
    """A cursor over one header value; grammar of RFC 7235 §2.1 (challenge = scheme
    [1*SP (token68 / #auth-param)])."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> list[Challenge]:
        result: list[Challenge] = []
        while True:
            self._skip(" \t,")
            scheme = self._token()
            if not scheme:
                return result
            params: dict[str, str] = {}
            self._skip(" \t")
            if not self._token68_here():
                self._params(params)
            result.append(Challenge(scheme=scheme.lower(), params=params))

    def _params(self, params: dict[str, str]) -> None:
        while True:
            self._skip(" \t,")
            start = self.pos
            name = self._token()
            self._skip(" \t")
            if not name or not self.text.startswith("=", self.pos):
                self.pos = start  # the next challenge's scheme
                return
            self.pos += 1
            self._skip(" \t")
            value = self._quoted() if self.text.startswith('"', self.pos) else self._token()
            params[name.lower()] = value

    def _token68_here(self) -> bool:
        """Consume a token68 (e.g. ``Basic abc==``) if one is next; True if consumed."""
        match = _TOKEN68_RE.match(self.text, self.pos)
        if match is None:
            return False
        self.pos = match.end()
        return True

    def _skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def _token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TOKEN_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def _quoted(self) -> str:
        chars: list[str] = []
        self.pos += 1
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "\\" and self.pos < len(self.text):
                chars.append(self.text[self.pos])
                self.pos += 1
            elif ch == '"':
                break
            else:
                chars.append(ch)
        return "".join(chars)


# --- the authenticator -----------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Chooses and caches ``Authorization`` headers per (registry host, scope).

    ``fetch`` performs token-endpoint requests (see :data:`TokenFetch`); ``clock`` is a
    monotonic seconds clock deciding token expiry; ``plain_http_ok(host)`` says whether
    credentials may be sent to ``host`` over plain HTTP (loopback/insecure hosts).
    Safe for concurrent use: concurrent token fetches for one key are deduplicated.
    """

    def __init__(
        self,
        credentials: CredentialStore,
        fetch: TokenFetch,
        *,
        clock: Callable[[], float] = time.monotonic,
        plain_http_ok: Callable[[str], bool] = lambda host: False,
    ) -> None:
        self._credentials = credentials
        self._fetch = fetch
        self._clock = clock
        self._plain_http_ok = plain_http_ok
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._challenges: dict[str, Challenge] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"Authenticator(hosts={sorted(self._challenges)}, tokens={len(self._tokens)})"

    async def authorization(self, host: str, scope: str) -> str | None:
        """The header to send up front, or None to go anonymous until challenged.

        Uses a cached unexpired token, Basic credentials for a host that asked for Basic,
        or fetches a token when the host's Bearer challenge is already known.
        """
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._credentials.get(host)
            return creds.basic_header() if creds is not None and creds.has_password else None
        return "Bearer " + await self._token(host, scope, challenge, rejected=None)

    async def on_unauthorized(
        self, host: str, scope: str, www_authenticate: Sequence[str], sent: str | None
    ) -> str:
        """After a 401 that followed sending ``sent``: the header to retry with.

        Raises RegistryAuthError when there is no usable challenge, when Basic auth is
        required but no credentials are configured or they were just refused; the token
        flow's errors otherwise propagate.
        """
        challenges = parse_www_authenticate(www_authenticate)
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None:
            raise RegistryAuthError(f"{host}: 401 without a Bearer or Basic challenge")
        self._challenges[host] = chosen
        if chosen.scheme == "basic":
            creds = self._credentials.get(host)
            if creds is None or not creds.has_password:
                raise RegistryAuthError(f"{host}: Basic auth required, no credentials configured")
            header = creds.basic_header()
            if sent == header:
                raise RegistryAuthError(f"{host}: credentials refused")
            return header
        rejected = sent[len("Bearer ") :] if sent and sent.startswith("Bearer ") else None
        return "Bearer " + await self._token(host, scope, chosen, rejected=rejected)

    def forget(self, host: str) -> None:
        """Drop every cached token and the remembered challenge of ``host``."""
        self._challenges.pop(host, None)
        for key in [k for k in self._tokens if k[0] == host]:
            del self._tokens[key]

    async def _token(
        self, host: str, scope: str, challenge: Challenge, rejected: str | None
    ) -> str:
        key = (host, scope)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if (
                cached is not None
                and cached.value != rejected
                and self._clock() < cached.expires_at
            ):
                return cached.value
            value, lifetime = await self._request_token(host, scope, challenge)
            self._tokens[key] = _Token(value=value, expires_at=self._clock() + lifetime)
            log.debug("obtained a token for %s scope %s valid %.0fs", host, scope, lifetime)
            return value

    async def _request_token(
        self, host: str, scope: str, challenge: Challenge
    ) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryAuthError(f"{host}: Bearer challenge without a usable realm")
        scopes = list(dict.fromkeys(s for s in (scope, challenge.params.get("scope")) if s))
        service = challenge.params.get("service", "")
        creds = self._credentials.get(host)
        if creds is not None and parts.scheme == "http" and not self._plain_http_ok(parts.netloc):
            log.debug("%s: not sending credentials to a plain-HTTP token realm", host)
            creds = None
        if creds is not None and creds.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "service": service,
                "scope": " ".join(scopes),
                "client_id": CLIENT_ID,
            }
            status, body = await self._fetch("POST", realm, {}, form)
        else:
            query = urlencode([("service", service), *(("scope", s) for s in scopes)])
            url = f"{realm}{'&' if parts.query else '?'}{query}"
            headers = (
                {"Authorization": creds.basic_header()} if creds and creds.has_password else {}
            )
            status, body = await self._fetch("GET", url, headers, None)
        what = f"token for {host} from {parts.netloc}"
        if status != 200:
            error = error_for_status(status, what)
            if status < 500 and status not in (408, 429):
                raise RegistryAuthError(f"{what}: HTTP {status}")
            raise error
        return _token_from_body(body, what)


def _token_from_body(body: bytes, what: str) -> tuple[str, float]:
    """``(token, lifetime seconds)`` from a token endpoint's JSON answer."""
    try:
        document = json.loads(body[:MAX_TOKEN_RESPONSE])
    except (ValueError, UnicodeDecodeError):
        raise RegistryAuthError(f"{what}: the answer is not JSON") from None
    if not isinstance(document, dict):
        raise RegistryAuthError(f"{what}: the answer is not a JSON object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token:
        raise RegistryAuthError(f"{what}: the answer carries no token")
    lifetime = document.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return token, float(lifetime)
