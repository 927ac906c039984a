"""RegistryClient blob reads against the in-process fake registry (ranges, faults, redirects)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from snapshotter.errdefs import (
    BlobNotFound,
    FailedPrecondition,
    InvalidArgument,
    RangeNotSatisfiable,
    RegistryTimeout,
    RegistryUnavailable,
)
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.base import BlobFetcher
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.registry import RegistryClient
from snapshotter.registry.retry import RetryPolicy
from tests.fakeregistry import FakeRegistry, FakeStorage

REPO = "library/app"
DATA = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(10_000))
SLEEPS: list[float] = []


async def no_sleep(seconds: float) -> None:
    SLEEPS.append(seconds)


def make_client(table: dict[str, Any] | None = None, attempts: int = 4) -> RegistryClient:
    settings: dict[str, Any] = {"request_timeout": 5.0, "coalesce_gap": 0}
    settings.update(table or {})
    retry = RetryPolicy(max_attempts=attempts, deadline=30.0, sleep=no_sleep, random=lambda: 0.5)
    return RegistryClient(
        HostsConfig.from_dict(settings), credentials=CredentialStore(), retry=retry
    )


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = await FakeRegistry().start()
    yield fake
    await fake.aclose()


@pytest.fixture
async def storage() -> AsyncIterator[FakeStorage]:
    fake = await FakeStorage().start()
    yield fake
    await fake.aclose()


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    c = make_client()
    yield c
    await c.aclose()


def blob_gets(fake: FakeRegistry | FakeStorage) -> list[str]:
    """The Range headers of the GETs the server saw for blobs."""
    return [
        r.headers.get("Range", "")
        for r in fake.requests
        if r.method == "GET" and ("/blobs/" in r.path or "/objects/" in r.path)
    ]


async def test_single_range(registry: FakeRegistry, client: RegistryClient) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    assert await client.fetch_ranges(ref, digest, [(10, 20)]) == [DATA[10:20]]
    (request,) = registry.requests
    assert request.headers["Range"] == "bytes=10-19"
    assert request.headers["Accept-Encoding"] == "identity"
    assert "Authorization" not in request.headers


async def test_multi_range_in_one_request(registry: FakeRegistry, client: RegistryClient) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    wanted = [(5000, 6000), (0, 10), (100, 200), (150, 160), (7, 7), (len(DATA) - 1, len(DATA))]
    got = await client.fetch_ranges(ref, digest, wanted)
    assert got == [DATA[s:e] for s, e in wanted]
    assert blob_gets(registry) == [f"bytes=0-9,100-199,5000-5999,{len(DATA) - 1}-{len(DATA) - 1}"]
    assert client.stats.requests[("blob_multirange", "2xx")] == 1
    assert client.multi_range_enabled(registry.host)


async def test_ranges_are_coalesced_and_split(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    client = make_client({"coalesce_gap": 100, "max_request_bytes": 1000, "multi_range": False})
    try:
        got = await client.fetch_ranges(ref, digest, [(0, 10), (50, 60), (3000, 5500)])
    finally:
        await client.aclose()
    assert got == [DATA[0:10], DATA[50:60], DATA[3000:5500]]
    assert sorted(blob_gets(registry)) == sorted(
        ["bytes=0-59", "bytes=3000-3999", "bytes=4000-4999", "bytes=5000-5499"]
    )


async def test_multi_range_batches_are_bounded(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    client = make_client({"max_ranges_per_request": 2})
    wanted = [(i * 1000, i * 1000 + 10) for i in range(5)]
    try:
        assert await client.fetch_ranges(ref, digest, wanted) == [DATA[s:e] for s, e in wanted]
    finally:
        await client.aclose()
    assert sorted(h.count(",") for h in blob_gets(registry)) == [0, 1, 1]


@pytest.mark.parametrize("behaviour", ["refuse", "ignore", "first"])
async def test_multi_range_fallback_is_permanent(
    registry: FakeRegistry, client: RegistryClient, behaviour: str
) -> None:
    registry.multi_range = behaviour
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    wanted = [(0, 10), (100, 200), (5000, 6000)]
    assert await client.fetch_ranges(ref, digest, wanted) == [DATA[s:e] for s, e in wanted]
    assert not client.multi_range_enabled(registry.host)
    assert client.stats.multi_range_fallbacks == 1
    registry.requests.clear()
    assert await client.fetch_ranges(ref, digest, wanted) == [DATA[s:e] for s, e in wanted]
    assert sorted(blob_gets(registry)) == ["bytes=0-9", "bytes=100-199", "bytes=5000-5999"]


async def test_registry_ignoring_range_is_sliced(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    registry.ignore_range = True
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    assert await client.fetch_ranges(ref, digest, [(300, 400)]) == [DATA[300:400]]
    assert await client.fetch_ranges(ref, digest, [(0, 1), (900, 1000)]) == [
        DATA[0:1],
        DATA[900:1000],
    ]
    assert client.stats.bytes_received < 3 * 1000


async def test_range_past_the_end(registry: FakeRegistry, client: RegistryClient) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    with pytest.raises(RangeNotSatisfiable):
        await client.fetch_ranges(ref, digest, [(len(DATA) + 10, len(DATA) + 20)])
    with pytest.raises(RangeNotSatisfiable):
        await client.fetch_ranges(ref, digest, [(len(DATA) - 10, len(DATA) + 20)])
    registry.ignore_range = True
    with pytest.raises(RangeNotSatisfiable):
        await client.fetch_ranges(ref, digest, [(len(DATA) - 10, len(DATA) + 20)])


async def test_invalid_arguments(registry: FakeRegistry, client: RegistryClient) -> None:
    ref = f"{registry.host}/{REPO}:latest"
    digest = "sha256:" + "0" * 64
    with pytest.raises(InvalidArgument):
        await client.fetch_ranges(ref, digest, [(5, 1)])
    with pytest.raises(InvalidArgument):
        await client.fetch_ranges(ref, "sha256:short", [(0, 1)])
    with pytest.raises(InvalidArgument):
        await client.fetch_ranges("Not A Ref", digest, [(0, 1)])
    assert await client.fetch_ranges(ref, digest, [(3, 3)]) == [b""]
    assert registry.requests == []


async def test_server_errors_are_retried(registry: FakeRegistry, client: RegistryClient) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    registry.faults = [500, 503, 502]
    assert await client.fetch_ranges(ref, digest, [(0, 100)]) == [DATA[:100]]
    assert client.stats.retries == 3
    assert client.stats.requests[("blob_range", "5xx")] == 3
    assert client.stats.errors == {}


async def test_persistent_errors_give_up_with_cause(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    digest = registry.put_blob(REPO, DATA)
    registry.faults = [500] * 10
    with pytest.raises(RegistryUnavailable) as info:
        await client.fetch_ranges(f"{registry.host}/{REPO}:latest", digest, [(0, 100)])
    assert "HTTP 500" in str(info.value) and "4 attempts" in str(info.value)
    assert client.stats.errors["RegistryUnavailable"] == 1


async def test_not_found_is_not_retried(registry: FakeRegistry, client: RegistryClient) -> None:
    with pytest.raises(BlobNotFound):
        await client.fetch_ranges(f"{registry.host}/{REPO}:latest", "sha256:" + "1" * 64, [(0, 1)])
    with pytest.raises(BlobNotFound):
        await client.blob_size(f"{registry.host}/{REPO}:latest", "sha256:" + "1" * 64)
    assert client.stats.retries == 0 and len(registry.requests) == 2


async def test_dropped_connection_mid_body_is_retried(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    registry.faults = ["drop", "drop"]
    assert await client.fetch_ranges(ref, digest, [(0, 5000)]) == [DATA[:5000]]
    assert client.stats.retries == 2
    assert client.stats.requests[("blob_range", "error")] == 2


async def test_hanging_registry_times_out(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    registry.faults = ["hang", "hang"]
    client = make_client({"request_timeout": 0.2}, attempts=2)
    try:
        with pytest.raises(RegistryTimeout) as info:
            await client.fetch_ranges(f"{registry.host}/{REPO}:latest", digest, [(0, 10)])
    finally:
        await client.aclose()
    assert "timed out" in str(info.value)


async def test_blob_size_head_and_get_fallback(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    assert await client.blob_size(ref, digest) == len(DATA)
    assert [r.method for r in registry.requests] == ["HEAD"]
    registry.head_status = 405
    registry.requests.clear()
    assert await client.blob_size(ref, digest) == len(DATA)
    assert [(r.method, r.headers.get("Range")) for r in registry.requests] == [
        ("HEAD", None),
        ("GET", "bytes=0-1"),
    ]
    registry.ignore_range = True
    assert await client.blob_size(ref, digest) == len(DATA)
    empty = registry.put_blob(REPO, b"")
    registry.head_status = None
    assert await client.blob_size(ref, empty) == 0


async def test_redirect_to_storage(registry: FakeRegistry, storage: FakeStorage) -> None:
    registry.auth = "bearer"
    registry.storage = storage
    digest = registry.put_blob(REPO, DATA)
    ref = f"{registry.host}/{REPO}:latest"
    client = make_client()
    try:
        assert await client.blob_size(ref, digest) == len(DATA)
        assert await client.fetch_ranges(ref, digest, [(0, 10)]) == [DATA[:10]]
        registry_gets = len(blob_gets(registry))
        # later reads go straight to the cached storage URL
        assert await client.fetch_ranges(ref, digest, [(20, 30), (40, 50)]) == [
            DATA[20:30],
            DATA[40:50],
        ]
        assert len(blob_gets(registry)) == registry_gets
        # an expired signature is re-resolved through the registry once
        storage.expire_signatures()
        assert await client.fetch_ranges(ref, digest, [(60, 70)]) == [DATA[60:70]]
        assert client.stats.redirect_reresolves == 1
        assert len(blob_gets(registry)) == registry_gets + 1
    finally:
        await client.aclose()
    assert any("Authorization" in r.headers for r in registry.requests)
    assert storage.requests and all("Authorization" not in r.headers for r in storage.requests)
    assert client.stats.redirects >= 2


async def test_storage_faults_are_retried(registry: FakeRegistry, storage: FakeStorage) -> None:
    registry.storage = storage
    digest = registry.put_blob(REPO, DATA)
    storage.faults = [500, "drop"]
    client = make_client()
    try:
        got = await client.fetch_ranges(f"{registry.host}/{REPO}:latest", digest, [(5, 50)])
    finally:
        await client.aclose()
    assert got == [DATA[5:50]]
    assert client.stats.retries == 2


async def test_mirrors_first_then_origin(registry: FakeRegistry) -> None:
    mirror = await FakeRegistry().start()
    try:
        digest = registry.put_blob(REPO, DATA)
        mirror.put_blob(REPO, DATA)
        ref = f"{registry.host}/{REPO}:latest"
        client = make_client({"mirrors": {registry.host: [mirror.url]}})
        try:
            assert await client.fetch_ranges(ref, digest, [(0, 10)]) == [DATA[:10]]
            assert registry.requests == [] and len(mirror.requests) == 1
            assert mirror.requests[0].query == {"ns": registry.host}
            mirror.blobs.clear()  # the mirror answers 404: fall back to the origin
            assert await client.fetch_ranges(ref, digest, [(10, 20)]) == [DATA[10:20]]
            assert len(registry.requests) == 1
            mirror.faults = [500]
            assert await client.fetch_ranges(ref, digest, [(20, 30)]) == [DATA[20:30]]
            assert client.stats.mirror_fallbacks == 2 and client.stats.retries == 0
        finally:
            await client.aclose()
    finally:
        await mirror.aclose()


async def test_unreachable_mirror_falls_back(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    dead = await FakeRegistry().start()
    await dead.aclose()  # nothing listens on its port any more
    client = make_client({"mirrors": {registry.host: [dead.url]}})
    try:
        got = await client.fetch_ranges(f"{registry.host}/{REPO}:latest", digest, [(0, 10)])
    finally:
        await client.aclose()
    assert got == [DATA[:10]]
    assert client.stats.mirror_fallbacks == 1


async def test_unreachable_origin_is_unavailable() -> None:
    dead = await FakeRegistry().start()
    await dead.aclose()
    client = make_client(attempts=2)
    try:
        with pytest.raises(RegistryUnavailable) as info:
            await client.blob_size(f"{dead.host}/{REPO}:latest", "sha256:" + "2" * 64)
    finally:
        await client.aclose()
    assert dead.host in str(info.value)


async def test_concurrency_is_bounded_per_host(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    client = make_client({"max_concurrency": 2, "multi_range": False})
    in_flight = peak = 0
    real_send = client._transport.send

    async def counting_send(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await real_send(*args, **kwargs)
        finally:
            in_flight -= 1

    client._transport.send = counting_send  # type: ignore[method-assign]
    wanted = [(i * 100, i * 100 + 10) for i in range(12)]
    try:
        got = await client.fetch_ranges(f"{registry.host}/{REPO}:latest", digest, wanted)
    finally:
        await client.aclose()
    assert got == [DATA[s:e] for s, e in wanted]
    assert 1 <= peak <= 2
    assert len(blob_gets(registry)) == 12


async def test_blob_fetcher(registry: FakeRegistry, client: RegistryClient) -> None:
    digest = registry.put_blob(REPO, DATA)
    fetcher: BlobFetcher = client.open_blob(f"{registry.host}/{REPO}:latest", digest)
    assert fetcher.digest == digest
    assert await fetcher.size() == len(DATA)
    assert await fetcher.fetch([(1, 2), (len(DATA) - 2, len(DATA))]) == [
        DATA[1:2],
        DATA[-2:],
    ]
    assert await fetcher.size() == len(DATA)
    assert [r.method for r in registry.requests].count("HEAD") == 1
    before = len(registry.requests)
    with pytest.raises(RangeNotSatisfiable):
        await fetcher.fetch([(0, len(DATA) + 1)])
    with pytest.raises(InvalidArgument):
        await fetcher.fetch([(-1, 3)])
    assert len(registry.requests) == before
    await fetcher.aclose()
    await fetcher.aclose()
    with pytest.raises(FailedPrecondition):
        await fetcher.fetch([(0, 1)])
    seeded = client.open_blob(f"{registry.host}/{REPO}:latest", digest, size=len(DATA))
    assert await seeded.size() == len(DATA)
    assert len(registry.requests) == before
    with pytest.raises(InvalidArgument):
        client.open_blob(f"{registry.host}/{REPO}:latest", "sha256:nope")


async def test_aclose_is_idempotent(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    client = make_client()
    await client.fetch_ranges(f"{registry.host}/{REPO}:latest", digest, [(0, 1)])
    await client.aclose()
    await client.aclose()
    with pytest.raises(FailedPrecondition):
        await client.fetch_ranges(f"{registry.host}/{REPO}:latest", digest, [(0, 1)])


async def test_storage_refusing_head(registry: FakeRegistry, storage: FakeStorage) -> None:
    registry.storage = storage
    storage.head_status = 403
    digest = registry.put_blob(REPO, DATA)
    client = make_client()
    try:
        assert await client.blob_size(f"{registry.host}/{REPO}:latest", digest) == len(DATA)
    finally:
        await client.aclose()
    assert [(r.method, r.headers.get("Range")) for r in storage.requests] == [
        ("HEAD", None),
        ("GET", "bytes=0-1"),
    ]
