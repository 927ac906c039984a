"""Credentials, challenge parsing and the token flow (snapshotter.registry.auth), no network."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from snapshotter.errdefs import ConfigError, RegistryAuthError, RegistryUnavailable
from snapshotter.registry.auth import (
    DEFAULT_TOKEN_LIFETIME,
    Authenticator,
    Challenge,
    Credentials,
    CredentialStore,
    parse_www_authenticate,
)

PASSWORD = "pa55-w0rd-SECRET"
IDENTITY = "identity-token-SECRET"
TOKEN = "bearer-token-SECRET"
HOST = "reg.example"
SCOPE = "repository:app:pull"
CHALLENGE = f'Bearer realm="https://auth.example/token",service="reg",scope="{SCOPE}"'


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- WWW-Authenticate ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:samalba/my-app:pull,push"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:samalba/my-app:pull,push",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        (
            'Basic realm="a, b", Bearer realm=x, error="invalid_token"',
            [
                Challenge("basic", {"realm": "a, b"}),
                Challenge("bearer", {"realm": "x", "error": "invalid_token"}),
            ],
        ),
        (
            'BEARER Realm = "q\\"uoted" ,service=s',
            [Challenge("bearer", {"realm": 'q"uoted', "service": "s"})],
        ),
        ("Negotiate abc==, Basic", [Challenge("negotiate", {}), Challenge("basic", {})]),
        ("", []),
        ("  ,  ", []),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate([header]) == expected


def test_parse_www_authenticate_several_headers_and_garbage() -> None:
    parsed = parse_www_authenticate(['Basic realm="r"', 'Bearer realm="t"'])
    assert [c.scheme for c in parsed] == ["basic", "bearer"]
    for garbage in ('"', "=", 'Bearer realm="unterminated', "@@@", "Bearer ,,, ="):
        parse_www_authenticate([garbage])  # never raises


# --- docker config.json ----------------------------------------------------------------------


def test_docker_config_forms(tmp_path: Path) -> None:
    config = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": b64(f"hubuser:{PASSWORD}")},
            "reg.example": {"username": "u", "password": PASSWORD},
            "http://localhost:5000": {"identitytoken": IDENTITY},
            "ghcr.io": {"auth": b64("ghuser:with:colons")},
            "not a host!": {"auth": b64("x:y")},
        },
        "credsStore": "desktop",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    store = CredentialStore.from_docker_config(path)
    hub = store.get("docker.io")
    assert hub is not None and hub.username == "hubuser" and hub.password == PASSWORD
    assert store.get("registry-1.docker.io") == hub
    assert store.get("reg.example") == Credentials("u", PASSWORD)
    local = store.get("localhost:5000")
    assert local is not None and local.identity_token == IDENTITY and not local.has_password
    ghcr = store.get("ghcr.io")
    assert ghcr is not None and ghcr.password == "with:colons"
    assert store.get("quay.io") is None
    assert store.get("bad host") is None
    for text in (repr(store), repr(hub), str(hub)):
        assert PASSWORD not in text and "hubuser" not in text


def test_docker_config_missing_file_is_anonymous(tmp_path: Path) -> None:
    assert CredentialStore.from_docker_config(tmp_path / "nope.json").get(HOST) is None


@pytest.mark.parametrize(
    "text",
    [
        "not json " + PASSWORD,
        json.dumps([PASSWORD]),
        json.dumps({"auths": [PASSWORD]}),
        json.dumps({"auths": {HOST: {"auth": "!!" + PASSWORD}}}),
        json.dumps({"auths": {HOST: {"auth": b64(PASSWORD)}}}),
        json.dumps({"auths": {HOST: {"username": 1, "password": PASSWORD}}}),
    ],
)
def test_docker_config_malformed_never_echoes(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        CredentialStore.parse_docker_config(text)
    assert PASSWORD not in str(info.value)


def test_docker_config_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CredentialStore.from_docker_config(tmp_path)  # a directory


# --- Authenticator ---------------------------------------------------------------------------


class FakeTokenServer:
    """Records token requests; answers with canned (status, body)."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, dict[str, str], dict[str, str] | None]] = []

    async def __call__(
        self, method: str, url: str, headers: Mapping[str, str], form: Mapping[str, str] | None
    ) -> tuple[int, bytes]:
        self.calls.append((method, url, dict(headers), dict(form) if form is not None else None))
        if self.answers:
            return self.answers.pop(0)
        return 200, json.dumps({"token": TOKEN, "expires_in": 300}).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(creds: Credentials) -> CredentialStore:
    return CredentialStore({HOST: creds})


async def test_bearer_flow_anonymous_and_cache() -> None:
    server, clock = FakeTokenServer(), Clock()
    auth = Authenticator(CredentialStore(), server, clock=clock)
    assert await auth.authorization(HOST, SCOPE) is None
    header = await auth.on_unauthorized(HOST, SCOPE, [CHALLENGE], None)
    assert header == f"Bearer {TOKEN}"
    method, url, headers, form = server.calls[0]
    assert method == "GET" and form is None and "Authorization" not in headers
    query = parse_qs(urlsplit(url).query)
    assert query == {"service": ["reg"], "scope": [SCOPE]}
    # cached for the scope; other scopes fetch proactively with the remembered challenge
    assert await auth.authorization(HOST, SCOPE) == header
    assert len(server.calls) == 1
    assert await auth.authorization(HOST, "repository:other:pull") == header
    assert len(server.calls) == 2
    clock.now = 299.0
    assert await auth.authorization(HOST, SCOPE) == header
    assert len(server.calls) == 2
    clock.now = 301.0
    await auth.authorization(HOST, SCOPE)
    assert len(server.calls) == 3


async def test_bearer_flow_sends_basic_and_extra_scope() -> None:
    server = FakeTokenServer()
    auth = Authenticator(store(Credentials("user", PASSWORD)), server)
    challenge = (
        'Bearer realm="https://auth.example/token?a=1",service="reg",scope="repository:x:push"'
    )
    await auth.on_unauthorized(HOST, SCOPE, [challenge], None)
    _, url, headers, _ = server.calls[0]
    assert headers["Authorization"] == "Basic " + b64(f"user:{PASSWORD}")
    query = parse_qs(urlsplit(url).query)
    assert query == {"a": ["1"], "service": ["reg"], "scope": [SCOPE, "repository:x:push"]}


async def test_identity_token_uses_oauth_post() -> None:
    server = FakeTokenServer((200, json.dumps({"access_token": TOKEN}).encode()))
    clock = Clock()
    auth = Authenticator(store(Credentials(identity_token=IDENTITY)), server, clock=clock)
    assert await auth.on_unauthorized(HOST, SCOPE, [CHALLENGE], None) == f"Bearer {TOKEN}"
    method, url, headers, form = server.calls[0]
    assert method == "POST" and url == "https://auth.example/token" and not headers
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": IDENTITY,
        "service": "reg",
        "scope": SCOPE,
        "client_id": "lazysnap",
    }
    clock.now = DEFAULT_TOKEN_LIFETIME + 1  # no expires_in: 60 s
    await auth.authorization(HOST, SCOPE)
    assert len(server.calls) == 2


async def test_rejected_token_is_refetched_once() -> None:
    server = FakeTokenServer(
        (200, json.dumps({"token": "first-SECRET"}).encode()),
        (200, json.dumps({"token": "second-SECRET"}).encode()),
    )
    auth = Authenticator(CredentialStore(), server)
    first = await auth.on_unauthorized(HOST, SCOPE, [CHALLENGE], None)
    second = await auth.on_unauthorized(HOST, SCOPE, [CHALLENGE], first)
    assert (first, second) == ("Bearer first-SECRET", "Bearer second-SECRET")
    auth.forget(HOST)
    assert await auth.authorization(HOST, SCOPE) is None


async def test_plain_http_realm_gets_no_credentials_unless_allowed() -> None:
    challenge = 'Bearer realm="http://auth.example/token",service="reg"'
    server = FakeTokenServer()
    auth = Authenticator(store(Credentials("user", PASSWORD)), server)
    await auth.on_unauthorized(HOST, SCOPE, [challenge], None)
    assert "Authorization" not in server.calls[0][2]
    allowed = Authenticator(
        store(Credentials("user", PASSWORD)), server, plain_http_ok=lambda h: True
    )
    await allowed.on_unauthorized(HOST, SCOPE, [challenge], None)
    assert "Authorization" in server.calls[1][2]


async def test_basic_challenge() -> None:
    auth = Authenticator(store(Credentials("user", PASSWORD)), FakeTokenServer())
    header = await auth.on_unauthorized(HOST, SCOPE, ['Basic realm="r"'], None)
    assert header == "Basic " + b64(f"user:{PASSWORD}")
    assert await auth.authorization(HOST, SCOPE) == header
    with pytest.raises(RegistryAuthError) as refused:
        await auth.on_unauthorized(HOST, SCOPE, ['Basic realm="r"'], header)
    anonymous = Authenticator(CredentialStore(), FakeTokenServer())
    with pytest.raises(RegistryAuthError) as missing:
        await anonymous.on_unauthorized(HOST, SCOPE, ['Basic realm="r"'], None)
    for exc in (refused.value, missing.value):
        assert PASSWORD not in str(exc) and b64(f"user:{PASSWORD}") not in str(exc)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ((401, b""), RegistryAuthError),
        ((403, b""), RegistryAuthError),
        ((404, b""), RegistryAuthError),
        ((500, b""), RegistryUnavailable),
        ((429, b""), RegistryUnavailable),
        ((200, b"not json"), RegistryAuthError),
        ((200, b"[]"), RegistryAuthError),
        ((200, b'{"token": ""}'), RegistryAuthError),
        ((200, b'{"token": 5}'), RegistryAuthError),
    ],
)
async def test_token_endpoint_failures(answer: tuple[int, bytes], error: type[Exception]) -> None:
    auth = Authenticator(store(Credentials("user", PASSWORD)), FakeTokenServer(answer))
    with pytest.raises(error) as info:
        await auth.on_unauthorized(HOST, SCOPE, [CHALLENGE], None)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "challenges",
    [[], ["Negotiate"], ['Bearer service="x"'], ['Bearer realm="ftp://x/token"']],
)
async def test_unusable_challenges(challenges: list[str]) -> None:
    auth = Authenticator(CredentialStore(), FakeTokenServer())
    with pytest.raises(RegistryAuthError):
        await auth.on_unauthorized(HOST, SCOPE, challenges, None)


async def test_expires_in_is_honoured_and_defaulted() -> None:
    server = FakeTokenServer(
        (200, json.dumps({"token": "a", "expires_in": 0}).encode()),
        (200, json.dumps({"token": "b", "expires_in": "x"}).encode()),
    )
    clock = Clock()
    auth = Authenticator(CredentialStore(), server, clock=clock)
    await auth.on_unauthorized(HOST, SCOPE, [CHALLENGE], None)
    clock.now = 59.0
    assert await auth.authorization(HOST, SCOPE) == "Bearer a"
    clock.now = 61.0
    assert await auth.authorization(HOST, SCOPE) == "Bearer b"


async def test_secrets_never_logged_or_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    creds = Credentials("user", PASSWORD, IDENTITY)
    server = FakeTokenServer()
    auth = Authenticator(CredentialStore({HOST: creds}), server)
    header = await auth.on_unauthorized(HOST, SCOPE, [CHALLENGE], None)
    await auth.authorization(HOST, SCOPE)
    shown = caplog.text + repr(auth) + repr(creds) + str(creds) + repr(auth._tokens)
    for secret in (PASSWORD, IDENTITY, TOKEN, header):
        assert secret not in shown
