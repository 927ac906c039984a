"""RegistryClient authentication against the in-process fake registry."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from snapshotter.errdefs import RegistryAuthError
from snapshotter.registry.auth import Credentials, CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.registry import RegistryClient
from snapshotter.registry.retry import RetryPolicy
from tests.fakeregistry import FakeRegistry, FakeStorage

REPO = "private/app"
DATA = bytes(range(256)) * 64
PASSWORD = "s3cret-Pa55word"


async def no_sleep(_: float) -> None:
    return None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = await FakeRegistry().start()
    yield fake
    await fake.aclose()


def client_with(
    registry: FakeRegistry, creds: Credentials | None, clock: Clock | None = None
) -> RegistryClient:
    store = CredentialStore({registry.host: creds} if creds else {})
    return RegistryClient(
        HostsConfig(),
        credentials=store,
        retry=RetryPolicy(max_attempts=3, sleep=no_sleep),
        clock=clock,
    )


def count(registry: FakeRegistry, path: str, auth_prefix: str | None = None) -> int:
    return sum(
        1
        for r in registry.requests
        if r.path.startswith(path)
        and (auth_prefix is None or r.headers.get("Authorization", "").startswith(auth_prefix))
    )


async def test_bearer_anonymous_token_is_cached(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    client = client_with(registry, None)
    try:
        for _ in range(3):
            assert await client.fetch_ranges(ref, digest, [(0, 4)]) == [DATA[:4]]
    finally:
        await client.aclose()
    assert count(registry, "/token") == 1
    token_request = next(r for r in registry.requests if r.path == "/token")
    assert token_request.query == {"service": "fake-registry", "scope": f"repository:{REPO}:pull"}
    assert count(registry, "/v2/", "Bearer ") == 3
    assert count(registry, "/v2/") == 4  # one anonymous 401 first


async def test_bearer_token_endpoint_needs_credentials(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    registry.users = {"alice": PASSWORD}
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    good = client_with(registry, Credentials("alice", PASSWORD))
    anonymous = client_with(registry, None)
    wrong = client_with(registry, Credentials("alice", "nope"))
    try:
        assert await good.blob_size(ref, digest) == len(DATA)
        with pytest.raises(RegistryAuthError):
            await anonymous.blob_size(ref, digest)
        with pytest.raises(RegistryAuthError) as info:
            await wrong.blob_size(ref, digest)
        assert "nope" not in str(info.value)
        assert good.stats.retries == anonymous.stats.retries == 0
        assert anonymous.stats.errors["RegistryAuthError"] == 1
    finally:
        for c in (good, anonymous, wrong):
            await c.aclose()


async def test_revoked_token_is_replaced(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    client = client_with(registry, None)
    try:
        await client.fetch_ranges(ref, digest, [(0, 1)])
        registry.revoke_tokens()
        assert await client.fetch_ranges(ref, digest, [(1, 2)]) == [DATA[1:2]]
    finally:
        await client.aclose()
    assert count(registry, "/token") == 2


async def test_expired_token_is_renewed_up_front(registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    registry.token_field = "access_token"
    registry.token_lifetime = None  # the default lifetime, 60 s, applies
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    clock = Clock()
    client = client_with(registry, None, clock)
    try:
        await client.fetch_ranges(ref, digest, [(0, 1)])
        clock.now = 59.0
        await client.fetch_ranges(ref, digest, [(0, 1)])
        assert count(registry, "/token") == 1
        clock.now = 61.0
        await client.fetch_ranges(ref, digest, [(0, 1)])
    finally:
        await client.aclose()
    assert count(registry, "/token") == 2
    statuses_401 = client.stats.requests[("blob_range", "4xx")]
    assert statuses_401 == 1  # only the very first request was challenged


async def test_basic_auth(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.auth = "basic"
    registry.users = {"bob": PASSWORD}
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    config = tmp_path / "config.json"
    encoded = base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {f"http://{registry.host}": {"auth": encoded}}}))
    client = RegistryClient(
        HostsConfig.from_dict({"docker_config": str(config)}),
        retry=RetryPolicy(max_attempts=2, sleep=no_sleep),
    )
    try:
        assert await client.fetch_ranges(ref, digest, [(0, 8)]) == [DATA[:8]]
        assert await client.fetch_ranges(ref, digest, [(8, 16)]) == [DATA[8:16]]
    finally:
        await client.aclose()
    assert count(registry, "/v2/", "Basic ") == 2
    assert count(registry, "/v2/") == 3
    for creds in (None, Credentials("bob", "wrong")):
        other = client_with(registry, creds)
        try:
            with pytest.raises(RegistryAuthError):
                await other.fetch_ranges(ref, digest, [(0, 8)])
        finally:
            await other.aclose()


async def test_credentials_never_leak(
    registry: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    storage = await FakeStorage().start()
    registry.auth = "bearer"
    registry.users = {"carol": PASSWORD}
    registry.storage = storage
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    client = client_with(registry, Credentials("carol", PASSWORD))
    wrong = client_with(registry, Credentials("carol", PASSWORD + "x"))
    messages: list[str] = []
    try:
        await client.fetch_ranges(ref, digest, [(0, 8)])
        storage.faults = [500, 500, 500]
        for c in (client, wrong):
            try:
                await c.fetch_ranges(ref, digest, [(10, 20)])
            except Exception as exc:
                chain: BaseException | None = exc
                while chain is not None:
                    messages.append(str(chain) + repr(chain))
                    chain = chain.__cause__ or chain.__context__
    finally:
        await client.aclose()
        await wrong.aclose()
        await storage.aclose()
    assert len(messages) >= 2
    tokens = list(registry.valid_tokens)
    basic = base64.b64encode(f"carol:{PASSWORD}".encode()).decode()
    shown = caplog.text + "".join(messages) + repr(client) + repr(client._transport.auth)
    for secret in (PASSWORD, basic, "s3cr3t", *tokens):
        assert secret not in shown
