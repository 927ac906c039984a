"""RegistryClient.get_manifest against the in-process fake registry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

import pytest

from snapshotter.errdefs import BlobNotFound, DigestMismatch, FormatError, NotFound
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.platforms import Platform, current_platform
from snapshotter.registry.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
)
from snapshotter.registry.retry import RetryPolicy
from tests.fakeregistry import FakeRegistry

REPO = "team/app"


async def no_sleep(_: float) -> None:
    return None


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = await FakeRegistry().start()
    yield fake
    await fake.aclose()


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    c = RegistryClient(
        HostsConfig(),
        credentials=CredentialStore(),
        retry=RetryPolicy(max_attempts=3, sleep=no_sleep),
    )
    yield c
    await c.aclose()


def sha(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def manifest(layer: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(b"{}"),
                "size": 2,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(layer.encode()),
                    "size": 1,
                }
            ],
        }
    ).encode()


def index(entries: list[tuple[bytes, str, str, str | None]], media_type: str = OCI_INDEX) -> bytes:
    manifests = []
    for body, os_name, arch, variant in entries:
        platform = {"os": os_name, "architecture": arch}
        if variant:
            platform["variant"] = variant
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": sha(body),
                "size": len(body),
                "platform": platform,
            }
        )
    return json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}
    ).encode()


async def test_manifest_by_tag_and_digest(registry: FakeRegistry, client: RegistryClient) -> None:
    body = manifest("a")
    digest = registry.put_manifest(REPO, "v1", body, OCI_MANIFEST)
    assert await client.get_manifest(f"{registry.host}/{REPO}:v1") == (OCI_MANIFEST, digest, body)
    assert await client.get_manifest(f"{registry.host}/{REPO}@{digest}") == (
        OCI_MANIFEST,
        digest,
        body,
    )
    assert registry.requests[0].headers["Accept"] == MANIFEST_ACCEPT
    assert [r.path for r in registry.requests] == [
        f"/v2/{REPO}/manifests/v1",
        f"/v2/{REPO}/manifests/{digest}",
    ]
    assert client.stats.requests[("manifest", "2xx")] == 2


@pytest.mark.parametrize("list_type", [OCI_INDEX, DOCKER_LIST])
async def test_index_resolves_to_the_platform(
    registry: FakeRegistry, client: RegistryClient, list_type: str
) -> None:
    amd, arm, here = manifest("amd"), manifest("arm"), manifest("here")
    child_type = DOCKER_MANIFEST if list_type == DOCKER_LIST else OCI_MANIFEST
    for body in (amd, arm, here):
        registry.put_manifest(REPO, None, body, child_type)
    current = current_platform()
    entries = [
        (amd, "linux", "amd64", None),
        (arm, "linux", "arm64", "v8"),
    ]
    if current.architecture not in ("amd64", "arm64"):
        entries.append((here, "linux", current.architecture, current.variant or None))
    registry.put_manifest(REPO, "multi", index(entries, list_type), list_type)
    ref = f"{registry.host}/{REPO}:multi"
    got = await client.get_manifest(ref, Platform.parse("linux/arm64"))
    assert got == (child_type, sha(arm), arm)
    got = await client.get_manifest(ref, Platform.parse("linux/amd64"))
    assert got == (child_type, sha(amd), amd)
    expected = {"amd64": amd, "arm64": arm}.get(current.architecture, here)
    assert (await client.get_manifest(ref))[2] == expected
    with pytest.raises(NotFound):
        await client.get_manifest(ref, Platform.parse("linux/riscv64"))


async def test_media_type_from_body_when_content_type_is_generic(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    body = manifest("x")
    registry.put_manifest(REPO, "v1", body, "application/json")
    assert (await client.get_manifest(f"{registry.host}/{REPO}:v1"))[0] == OCI_MANIFEST
    bare_index = json.dumps({"manifests": []}).encode()
    registry.put_manifest(REPO, "idx", bare_index, "text/plain")
    with pytest.raises(NotFound):
        await client.get_manifest(f"{registry.host}/{REPO}:idx")


async def test_docker_content_digest_is_verified(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    registry.put_manifest(REPO, "v1", manifest("a"), OCI_MANIFEST)
    registry.wrong_digest_header = True
    with pytest.raises(DigestMismatch):
        await client.get_manifest(f"{registry.host}/{REPO}:v1")


async def test_body_is_verified_against_a_pinned_digest(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    pinned = sha(b"something else")
    registry.manifests[(REPO, pinned)] = (OCI_MANIFEST, manifest("a"))
    with pytest.raises(DigestMismatch):
        await client.get_manifest(f"{registry.host}/{REPO}@{pinned}")


async def test_malformed_index(registry: FakeRegistry, client: RegistryClient) -> None:
    registry.put_manifest(REPO, "bad", b"{not json", OCI_INDEX)
    with pytest.raises(FormatError):
        await client.get_manifest(f"{registry.host}/{REPO}:bad")
    nested = index([(index([]), "linux", "amd64", None)])
    registry.put_manifest(REPO, None, index([]), OCI_INDEX)
    registry.put_manifest(REPO, "nested", nested, OCI_INDEX)
    with pytest.raises(FormatError):
        await client.get_manifest(f"{registry.host}/{REPO}:nested", Platform.parse("linux/amd64"))
    bad_digest = json.dumps(
        {"manifests": [{"digest": "md5:x", "platform": {"os": "linux", "architecture": "amd64"}}]}
    ).encode()
    registry.put_manifest(REPO, "baddigest", bad_digest, OCI_INDEX)
    with pytest.raises(FormatError):
        await client.get_manifest(
            f"{registry.host}/{REPO}:baddigest", Platform.parse("linux/amd64")
        )


async def test_manifest_not_found_and_retried_errors(
    registry: FakeRegistry, client: RegistryClient
) -> None:
    with pytest.raises(BlobNotFound):
        await client.get_manifest(f"{registry.host}/{REPO}:missing")
    body = manifest("a")
    registry.put_manifest(REPO, "v1", body, OCI_MANIFEST)
    registry.faults = [502, "drop"]
    assert (await client.get_manifest(f"{registry.host}/{REPO}:v1"))[2] == body
    assert client.stats.retries == 2


async def test_manifest_from_mirror(registry: FakeRegistry) -> None:
    mirror = await FakeRegistry().start()
    body = manifest("m")
    mirror.put_manifest(REPO, "v1", body, OCI_MANIFEST)
    mirror.wrong_digest_header = True  # a broken mirror: fall back to the origin
    registry.put_manifest(REPO, "v1", body, OCI_MANIFEST)
    client = RegistryClient(
        HostsConfig.from_dict({"mirrors": {registry.host: [mirror.url]}}),
        credentials=CredentialStore(),
    )
    try:
        assert (await client.get_manifest(f"{registry.host}/{REPO}:v1"))[2] == body
        assert len(mirror.requests) == 1 and len(registry.requests) == 1
        mirror.wrong_digest_header = False
        assert (await client.get_manifest(f"{registry.host}/{REPO}:v1"))[2] == body
        assert len(mirror.requests) == 2 and len(registry.requests) == 1
    finally:
        await client.aclose()
        await mirror.aclose()
