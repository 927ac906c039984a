"""Nydus layers on Prepare: classification, bootstrap extraction and checks, fallbacks,
the daemon's spec, LazyLayers dispatch, restore and availability checks."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.errdefs import (
    DaemonError,
    FormatError,
    InvalidArgument,
    RemoteLayerError,
    Unavailable,
)
from snapshotter.formats import bootstrap_tar
from snapshotter.formats.digests import sha256_digest
from snapshotter.lazy import nydus
from snapshotter.lazy.layers import LazyLayers
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.registry import RegistryClient
from snapshotter.tools.convert import image as nimage
from snapshotter.tools.convert.tree import Spec
from snapshotter.tools.convert.write_v6 import write_v6
from tests.fakeregistry import FakeRegistry
from tests.unit.test_rafs_writer import FIXTURES

REPO = "nydus/app"
V5 = FIXTURES / "rafs-v5-sha256-nocompress"


def boot_tar(files: dict[str, bytes], compress: str = "gzip") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compress == "gzip":
        return gzip.compress(raw)
    if compress == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


# --- pure helpers --------------------------------------------------------------------------


def test_classify_by_label_presence() -> None:
    assert nydus.classify({L.NYDUS_BOOTSTRAP: ""}) is nydus.NydusKind.BOOTSTRAP
    assert nydus.classify({L.NYDUS_BLOB: "true"}) is nydus.NydusKind.BLOB
    assert nydus.classify({L.NYDUS_BLOB: "true", L.NYDUS_BOOTSTRAP: "true"}) \
        is nydus.NydusKind.BOOTSTRAP
    assert nydus.classify({L.TARGET_REF: "x"}) is None


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("name", ["image/image.boot", "./image/image.boot", "image.boot"])
def test_extract_bootstrap(compress: str, name: str) -> None:
    assert bootstrap_tar.extract_bootstrap(boot_tar({name: b"BOOT"}, compress), 100) == b"BOOT"


def test_new_location_wins_over_the_legacy_one() -> None:
    blob = boot_tar({"image.boot": b"old", "image/image.boot": b"new"})
    assert bootstrap_tar.extract_bootstrap(blob, 100) == b"new"


@pytest.mark.parametrize(("blob", "limit"), [
    (boot_tar({"other": b"x"}), 1000),
    (boot_tar({"image/image.boot": b"x" * 200}), 100),
    (gzip.compress(b"not a tar at all" * 100), 1000),
    (b"\x1f\x8b garbage", 1000),
    (boot_tar({"image/image.boot": b"x" * 5000}, "none")[:1500], 10_000),
], ids=["no-bootstrap", "over-limit", "not-a-tar", "corrupt-gzip", "truncated-tar"])
def test_extract_bootstrap_failures_are_format_errors(blob: bytes, limit: int) -> None:
    with pytest.raises(FormatError):
        bootstrap_tar.extract_bootstrap(blob, limit)


def test_layer_spec_carries_the_bootstrap() -> None:
    spec = LayerSpec.from_json({"layer_id": 3, "ref": "r/a:b", "digest": "sha256:" + "a" * 64,
                                "toc_digest": "sha256:" + "b" * 64, "format": "rafs-v6",
                                "bootstrap": "/root/snapshots/3/image.boot"})
    assert spec.bootstrap == "/root/snapshots/3/image.boot"
    assert LayerSpec.from_json(spec.to_json()) == spec
    for bad in ({"format": "rafs-v6", "bootstrap": "relative"},
                {"format": "estargz", "bootstrap": "/abs"}):
        with pytest.raises(InvalidArgument):
            LayerSpec.from_json({**spec.to_json(), **bad})


# --- NydusLayers against a fake registry ---------------------------------------------------


class FakeManager:
    """Records what would be mounted; ``fail`` makes mount raise DaemonError."""

    def __init__(self) -> None:
        self.mounted: dict[int, tuple[str, dict[str, Any]]] = {}
        self.started: dict[int, tuple[str, dict[str, Any]]] = {}
        self.fail = False

    async def mount(self, sid: int, mountpoint: str, spec: LayerSpec) -> None:
        if self.fail:
            raise DaemonError("daemon would not start")
        raw = spec.to_json()
        assert LayerSpec.from_json(raw) == spec  # what the daemon would accept
        self.mounted[sid] = (mountpoint, raw)

    def check(self, sid: int) -> None:
        if sid not in self.mounted:
            raise Unavailable(f"no daemon for {sid}")

    async def unmount(self, sid: int) -> None:
        self.mounted.pop(sid, None)

    async def start(self, wanted: dict[int, tuple[str, LayerSpec]]) -> None:
        self.started = {sid: (mnt, spec.to_json()) for sid, (mnt, spec) in wanted.items()}


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = await FakeRegistry().start()
    yield fake
    await fake.aclose()


@pytest.fixture
async def layers(registry: FakeRegistry) -> AsyncIterator[tuple[LazyLayers, FakeManager]]:
    client = RegistryClient(HostsConfig.from_dict({"request_timeout": 5.0, "max_retries": 0}),
                            credentials=CredentialStore())
    manager = FakeManager()
    lazy = LazyLayers(Config(), manager, client)  # type: ignore[arg-type]
    yield lazy, manager
    await lazy.aclose()
    await client.aclose()


def push(registry: FakeRegistry, boot_blob: bytes, blob: bytes | None = None,
         blob_media: str = nimage.NYDUS_BLOB_MEDIA_TYPE) -> tuple[str, str, str]:
    """(ref, bootstrap layer digest, blob layer digest) of a two-layer image."""
    boot_digest = registry.put_blob(REPO, boot_blob)
    blob_digest = registry.put_blob(REPO, blob) if blob is not None else ""
    manifest = {"schemaVersion": 2, "mediaType": nimage.OCI_MANIFEST,
                "config": {"mediaType": nimage.OCI_CONFIG, "digest": "sha256:" + "c" * 64,
                           "size": 2},
                "layers": [{"mediaType": blob_media, "digest": blob_digest, "size": 1},
                           {"mediaType": nimage.OCI_LAYER_GZIP, "digest": boot_digest,
                            "size": len(boot_blob)}]}
    registry.put_manifest(REPO, "latest", json.dumps(manifest).encode(), nimage.OCI_MANIFEST)
    return f"{registry.host}/{REPO}:latest", boot_digest, blob_digest


def labels_for(ref: str, digest: str, kind: str | None) -> dict[str, str]:
    out = {L.TARGET_REF: "sha256:" + "d" * 64, L.STARGZ_REFERENCE: ref, L.STARGZ_DIGEST: digest}
    if kind is not None:
        out[kind] = "true"
    return out


def mountpoint(tmp_path: Path, sid: int) -> str:
    fs = tmp_path / "snapshots" / str(sid) / "fs"
    fs.mkdir(parents=True)
    return str(fs)


async def test_bootstrap_layer_is_checked_written_and_mounted(
    tmp_path: Path, registry: FakeRegistry, layers: tuple[LazyLayers, FakeManager],
) -> None:
    lazy, manager = layers
    boot = (V5 / "bootstrap").read_bytes()
    (blob_file,) = (V5 / "blobs").iterdir()
    ref, boot_digest, blob_digest = push(registry, boot_tar({"image/image.boot": boot}),
                                         blob_file.read_bytes())
    mnt = mountpoint(tmp_path, 7)
    fmt = await lazy.mount(7, mnt, labels_for(ref, boot_digest, L.NYDUS_BOOTSTRAP))
    assert fmt == "rafs-v5"
    path = Path(mnt).parent / "image.boot"
    assert path.read_bytes() == boot
    (where, spec) = manager.mounted[7]
    assert where == mnt
    assert (spec["format"], spec["bootstrap"], spec["digest"], spec["ref"]) == (
        "rafs-v5", str(path), boot_digest, ref)
    assert spec["toc_digest"] == sha256_digest(boot)
    blob_gets = [r for r in registry.requests if r.path.endswith(blob_digest)]
    assert blob_gets and all(r.method == "HEAD" for r in blob_gets)  # size only, no data
    lazy.check(7)


async def test_blob_layer_needs_no_daemon_and_no_network(
    tmp_path: Path, registry: FakeRegistry, layers: tuple[LazyLayers, FakeManager],
) -> None:
    lazy, manager = layers
    fmt = await lazy.mount(3, mountpoint(tmp_path, 3), {L.NYDUS_BLOB: "true",
                                                        L.TARGET_REF: "x"})
    assert fmt == "nydus-blob" and manager.mounted == {} and registry.requests == []
    lazy.check(3)  # available without a daemon
    await lazy.unmount(3)
    with pytest.raises(Unavailable):
        lazy.check(3)


@pytest.mark.parametrize(("what", "reason"), [
    ("truncated", "invalid_bootstrap"), ("magic", "invalid_bootstrap"),
    ("no-boot", "invalid_bootstrap"), ("missing-blob", "blob_not_found"),
    ("digest", "digest_mismatch"), ("no-source", "no_source"), ("daemon", "daemon_error"),
    ("bad-blob-id", "invalid_bootstrap"), ("short-blob", "invalid_bootstrap"),
])
async def test_unusable_bootstrap_layers_fall_back_with_a_reason(
    what: str, reason: str, tmp_path: Path, registry: FakeRegistry,
    layers: tuple[LazyLayers, FakeManager],
) -> None:
    lazy, manager = layers
    boot = (V5 / "bootstrap").read_bytes()
    (blob_file,) = (V5 / "blobs").iterdir()
    blob: bytes | None = blob_file.read_bytes()
    files = {"image/image.boot": boot}
    if what == "truncated":
        files = {"image/image.boot": boot[:9000]}
    elif what == "magic":
        files = {"image/image.boot": b"XXXX" + boot[4:]}
    elif what == "no-boot":
        files = {"image/other": boot}
    elif what == "missing-blob":
        blob = None
    elif what == "bad-blob-id":
        files = {"image/image.boot": boot.replace(blob_file.name.encode(), b"Z" * 64)}
    elif what == "short-blob":
        out = write_v6([Spec("f", "reg", data=bytes(range(256)) * 40)])
        files = {"image/image.boot": out.bootstrap}
        (blob_id,) = out.blobs
        registry.blobs[(REPO, f"sha256:{blob_id}")] = b"short"
    ref, boot_digest, _ = push(registry, boot_tar(files), blob)
    labels = labels_for(ref, boot_digest, L.NYDUS_BOOTSTRAP)
    if what == "digest":
        registry.blobs[(REPO, boot_digest)] = boot_tar({"image/image.boot": boot[:100]})
    elif what == "no-source":
        labels = {L.NYDUS_BOOTSTRAP: "true", L.TARGET_REF: "x"}
    elif what == "daemon":
        manager.fail = True
    mnt = mountpoint(tmp_path, 9)
    with pytest.raises(RemoteLayerError) as info:
        await lazy.mount(9, mnt, labels)
    assert info.value.reason == reason, info.value
    assert manager.mounted == {}
    assert not (Path(mnt).parent / "image.boot").exists()


async def test_unlabeled_nydus_layers_are_found_through_the_manifest(
    tmp_path: Path, registry: FakeRegistry, layers: tuple[LazyLayers, FakeManager],
) -> None:
    lazy, manager = layers
    boot = (V5 / "bootstrap").read_bytes()
    (blob_file,) = (V5 / "blobs").iterdir()
    ref, boot_digest, blob_digest = push(registry, boot_tar({"image/image.boot": boot}),
                                         blob_file.read_bytes())
    fmt = await lazy.mount(1, mountpoint(tmp_path, 1), labels_for(ref, blob_digest, None))
    assert fmt == "nydus-blob"
    fmt = await lazy.mount(2, mountpoint(tmp_path, 2), labels_for(ref, boot_digest, None))
    assert fmt == "rafs-v5" and 2 in manager.mounted


async def test_an_ordinary_layer_stays_not_estargz(
    tmp_path: Path, registry: FakeRegistry, layers: tuple[LazyLayers, FakeManager],
) -> None:
    lazy, _ = layers
    ref, digest, _ = push(registry, boot_tar({"etc/hosts": b"x"}), b"data",
                          blob_media=nimage.OCI_LAYER_GZIP)
    with pytest.raises(RemoteLayerError) as info:
        await lazy.mount(1, mountpoint(tmp_path, 1), labels_for(ref, digest, None))
    assert info.value.reason == "not_estargz"


async def test_restore_serves_bootstraps_again_and_blobs_stay_available(
    tmp_path: Path, layers: tuple[LazyLayers, FakeManager],
) -> None:
    lazy, manager = layers
    boot = (V5 / "bootstrap").read_bytes()
    boot_mnt, blob_mnt = mountpoint(tmp_path, 5), mountpoint(tmp_path, 4)
    (Path(boot_mnt).parent / "image.boot").write_bytes(boot)
    base = {L.REMOTE: L.REMOTE_VALUE, L.STARGZ_REFERENCE: "127.0.0.1:1/a:b",
            L.STARGZ_DIGEST: "sha256:" + "e" * 64}
    await lazy.restore({
        5: (boot_mnt, {**base, L.NYDUS_BOOTSTRAP: "true", L.REMOTE_FORMAT: "rafs-v5"}),
        4: (blob_mnt, {**base, L.NYDUS_BLOB: "true", L.REMOTE_FORMAT: "nydus-blob"}),
        6: (mountpoint(tmp_path, 6), {**base, L.REMOTE_FORMAT: "rafs-v6"}),  # file gone
    })
    assert set(manager.started) == {5}
    spec = manager.started[5][1]
    assert spec["bootstrap"] == str(Path(boot_mnt).parent / "image.boot")
    assert spec["toc_digest"] == sha256_digest(boot) and spec["format"] == "rafs-v5"
    lazy.check(4)
