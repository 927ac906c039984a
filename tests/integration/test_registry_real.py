"""RegistryClient against a real registry: Debian's Distribution 2.8 ``docker-registry``.

The registry runs on 127.0.0.1:<free port> with filesystem storage in a temporary
directory, started and stopped by this module. Content is pushed over the plain HTTP API
(monolithic blob uploads, manifest PUTs), then read back through RegistryClient.

Distribution 2.8 serves filesystem blobs with Go's ``http.ServeContent``: a multi-range
request is answered ``206 multipart/byteranges`` (one part per range, no merging), so the
client keeps multi-range mode on; the tests below assert exactly that.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.errdefs import BlobNotFound, RangeNotSatisfiable
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.platforms import Platform
from snapshotter.registry.registry import OCI_INDEX, OCI_MANIFEST, RegistryClient

REGISTRY_BINARY = "/usr/bin/docker-registry"
REPO = "lazysnap/it"
START_DEADLINE = 30.0
LAYER = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(40_000))


@dataclass(frozen=True)
class Seeded:
    host: str
    layer: str
    manifest: bytes
    manifest_digest: str
    arm_manifest: bytes
    index_digest: str


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def wait_ready(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    """Poll /v2/ until it answers 200; fail if the process dies or the deadline passes."""
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited with {process.returncode}: {log.read_text()}")
        try:
            if http("GET", f"{base}/v2/")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"docker-registry not ready after {START_DEADLINE}s: {log.read_text()}")


@pytest.fixture(scope="module")
def registry_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.fail(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry")
    root = tmp_path_factory.mktemp("registry")
    host = f"127.0.0.1:{free_port()}"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}\n"
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(process, f"http://{host}", log)
        yield host
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def push_blob(host: str, data: bytes) -> str:
    digest = sha(data)
    status, headers, _ = http("POST", f"http://{host}/v2/{REPO}/blobs/uploads/")
    assert status == 202, status
    location = headers["Location"]
    if location.startswith("/"):
        location = f"http://{host}{location}"
    separator = "&" if "?" in location else "?"
    status, _, body = http(
        "PUT",
        f"{location}{separator}digest={digest}",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 201, (status, body)
    return digest


def push_manifest(host: str, reference: str, body: bytes, media_type: str) -> str:
    status, headers, answer = http(
        "PUT", f"http://{host}/v2/{REPO}/manifests/{reference}", body, {"Content-Type": media_type}
    )
    assert status == 201, (status, answer)
    assert headers["Docker-Content-Digest"] == sha(body)
    return sha(body)


def image_manifest(host: str, arch: str, layer: str) -> bytes:
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    config_digest = push_blob(host, config)
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer,
                    "size": len(LAYER),
                }
            ],
        }
    ).encode()


@pytest.fixture(scope="module")
def seeded(registry_host: str) -> Seeded:
    layer = push_blob(registry_host, LAYER)
    amd = image_manifest(registry_host, "amd64", layer)
    arm = image_manifest(registry_host, "arm64", layer)
    amd_digest = push_manifest(registry_host, "v1", amd, OCI_MANIFEST)
    arm_digest = push_manifest(registry_host, sha(arm), arm, OCI_MANIFEST)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": d,
                    "size": len(b),
                    "platform": {"os": "linux", "architecture": a},
                }
                for d, b, a in ((amd_digest, amd, "amd64"), (arm_digest, arm, "arm64"))
            ],
        }
    ).encode()
    index_digest = push_manifest(registry_host, "multi", index, OCI_INDEX)
    return Seeded(registry_host, layer, amd, amd_digest, arm, index_digest)


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    c = RegistryClient(
        HostsConfig.from_dict({"coalesce_gap": 0, "deadline": 30.0}),
        credentials=CredentialStore(),
    )
    yield c
    await c.aclose()


async def test_single_range_reads(seeded: Seeded, client: RegistryClient) -> None:
    ref = f"{seeded.host}/{REPO}:v1"
    assert await client.fetch_ranges(ref, seeded.layer, [(0, 100)]) == [LAYER[:100]]
    end = len(LAYER)
    assert await client.fetch_ranges(ref, seeded.layer, [(end - 7, end)]) == [LAYER[-7:]]
    assert client.stats.requests[("blob_range", "2xx")] == 2
    with pytest.raises(RangeNotSatisfiable):
        await client.fetch_ranges(ref, seeded.layer, [(end + 1, end + 10)])


async def test_multi_range_reads_use_multipart(seeded: Seeded, client: RegistryClient) -> None:
    ref = f"{seeded.host}/{REPO}:v1"
    wanted = [(i * 40_000 + 3, i * 40_000 + 503) for i in range(30)] + [
        (7, 9),
        (1_000_000, 1_000_001),
    ]
    got = await client.fetch_ranges(ref, seeded.layer, wanted)
    assert got == [LAYER[s:e] for s, e in wanted]
    # Distribution 2.8 answers 206 multipart/byteranges: no fallback to single ranges.
    assert client.multi_range_enabled(seeded.host)
    assert client.stats.multi_range_fallbacks == 0
    assert client.stats.requests[("blob_multirange", "2xx")] == 2  # 31 pieces, 16 per request
    assert client.stats.requests[("blob_range", "2xx")] == 0


async def test_blob_size_and_fetcher(seeded: Seeded, client: RegistryClient) -> None:
    ref = f"{seeded.host}/{REPO}:v1"
    assert await client.blob_size(ref, seeded.layer) == len(LAYER)
    fetcher = client.open_blob(ref, seeded.layer)
    assert await fetcher.size() == len(LAYER)
    assert await fetcher.fetch([(10, 20), (500_000, 500_100)]) == [
        LAYER[10:20],
        LAYER[500_000:500_100],
    ]
    await fetcher.aclose()
    with pytest.raises(BlobNotFound):
        await client.blob_size(ref, sha(b"never pushed"))
    with pytest.raises(BlobNotFound):
        await client.fetch_ranges(ref, sha(b"never pushed"), [(0, 1)])


async def test_manifest_by_tag_and_digest(seeded: Seeded, client: RegistryClient) -> None:
    by_tag = await client.get_manifest(f"{seeded.host}/{REPO}:v1")
    assert by_tag == (OCI_MANIFEST, seeded.manifest_digest, seeded.manifest)
    by_digest = await client.get_manifest(f"{seeded.host}/{REPO}@{seeded.manifest_digest}")
    assert by_digest == by_tag
    with pytest.raises(BlobNotFound):
        await client.get_manifest(f"{seeded.host}/{REPO}:missing")


async def test_index_resolves_by_platform(seeded: Seeded, client: RegistryClient) -> None:
    ref = f"{seeded.host}/{REPO}:multi"
    media_type, digest, body = await client.get_manifest(ref, Platform.parse("linux/arm64"))
    assert (media_type, digest, body) == (
        OCI_MANIFEST,
        sha(seeded.arm_manifest),
        seeded.arm_manifest,
    )
    _, digest, _ = await client.get_manifest(ref, Platform.parse("linux/amd64"))
    assert digest == seeded.manifest_digest
    pinned = f"{seeded.host}/{REPO}@{seeded.index_digest}"
    assert (await client.get_manifest(pinned, Platform.parse("linux/arm64")))[
        2
    ] == seeded.arm_manifest
