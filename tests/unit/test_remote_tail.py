"""One suffix-range request gives a blob's size and its tail (footer + TOC on Prepare)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from snapshotter.errdefs import BlobNotFound
from snapshotter.registry.fetcher import read_tail
from tests.fakeregistry import FakeRegistry
from tests.unit.test_fs_fakes import FakeFetcher
from tests.unit.test_remote_registry_blobs import DATA, REPO, make_client


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = await FakeRegistry().start()
    yield fake
    await fake.aclose()


def blob_requests(registry: FakeRegistry) -> list[tuple[str, str | None]]:
    return [(r.method, r.headers.get("Range")) for r in registry.requests if "/blobs/" in r.path]


async def test_one_request_answers_size_and_tail(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    client = make_client()
    try:
        fetcher = client.open_blob(f"{registry.host}/{REPO}:1", digest)
        assert await read_tail(fetcher, 1000) == (len(DATA), DATA[-1000:])
        assert blob_requests(registry) == [("GET", "bytes=-1000")]
        assert await fetcher.size() == len(DATA)  # cached: no HEAD
        assert await read_tail(fetcher, 10) == (len(DATA), DATA[-10:])  # a plain range now
        assert blob_requests(registry)[1:] == [("GET", f"bytes={len(DATA) - 10}-{len(DATA) - 1}")]
        small = registry.put_blob(REPO, b"tiny")
        assert await read_tail(client.open_blob(f"{registry.host}/{REPO}:1", small), 1000) \
            == (4, b"tiny")  # a suffix longer than the blob is the whole blob
    finally:
        await client.aclose()


async def test_a_host_ignoring_ranges_costs_a_size_request(registry: FakeRegistry) -> None:
    digest = registry.put_blob(REPO, DATA)
    registry.ignore_range = True
    client = make_client()
    try:
        fetcher = client.open_blob(f"{registry.host}/{REPO}:1", digest)
        assert await read_tail(fetcher, 1000) == (len(DATA), DATA[-1000:])
        methods = [m for m, _ in blob_requests(registry)]
        assert methods == ["GET", "HEAD", "GET"]  # suffix refused, then size + range
    finally:
        await client.aclose()


async def test_missing_blob_is_blob_not_found(registry: FakeRegistry) -> None:
    client = make_client()
    try:
        fetcher = client.open_blob(f"{registry.host}/{REPO}:1", "sha256:" + "0" * 64)
        with pytest.raises(BlobNotFound):
            await read_tail(fetcher, 1000)
    finally:
        await client.aclose()


async def test_other_fetchers_use_size_and_a_range() -> None:
    fake = FakeFetcher(b"0123456789")
    assert await read_tail(fake, 4) == (10, b"6789")
    assert fake.calls == [[(6, 10)]]
