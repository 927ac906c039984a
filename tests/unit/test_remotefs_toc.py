"""LazyLayers hands the TOC it checked on Prepare to the daemon, and cleans it up."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.lazy.layers import LazyLayers
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.registry import RegistryClient
from tests import estargz_writer as ew
from tests.fakeregistry import FakeRegistry
from tests.unit.test_nydus import FakeManager, mountpoint

REPO = "esgz/app"


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[LazyLayers, FakeManager, FakeRegistry]]:
    registry = await FakeRegistry().start()
    client = RegistryClient(HostsConfig.from_dict({"request_timeout": 5.0, "max_retries": 0}),
                            credentials=CredentialStore())
    manager = FakeManager()
    config = Config(root=str(tmp_path))
    layers = LazyLayers(config, manager, client)  # type: ignore[arg-type]
    yield layers, manager, registry
    await layers.aclose()
    await client.aclose()
    await registry.aclose()


async def test_checked_toc_is_written_for_the_daemon_and_removed_with_it(
        tmp_path: Path, setup: tuple[LazyLayers, FakeManager, FakeRegistry]) -> None:
    layers, manager, registry = setup
    built = ew.build_estargz([ew.directory("d"), ew.reg("d/f", b"data" * 64)])
    digest = registry.put_blob(REPO, built.blob)
    labels = {L.TARGET_REF: "sha256:" + "d" * 64, L.STARGZ_REFERENCE: f"{registry.host}/{REPO}:1",
              L.STARGZ_DIGEST: digest, L.TOC_DIGEST: built.toc_digest}
    assert await layers.mount(7, mountpoint(tmp_path, 7), labels) == "estargz"
    spec = manager.mounted[7][1]
    assert Path(spec["toc_file"]).read_bytes() == built.toc_json
    assert spec["blob_size"] == len(built.blob) and 0 < spec["toc_offset"] < len(built.blob)
    assert spec["toc_digest"] == built.toc_digest
    assert oct(os.stat(Path(spec["toc_file"]).parent).st_mode & 0o777) == "0o700"
    await layers.unmount(7)
    assert not Path(spec["toc_file"]).exists()


async def test_restore_drops_tocs_of_snapshots_that_are_gone(
        tmp_path: Path, setup: tuple[LazyLayers, FakeManager, FakeRegistry]) -> None:
    layers, _, _ = setup
    tocs = Path(layers.config.toc_dir)
    tocs.mkdir()
    for name in ("3.json", "4.json", "4.tmp", "junk"):
        (tocs / name).write_bytes(b"{}")
    live = {L.STARGZ_REFERENCE: "127.0.0.1:1/esgz/app:1", L.STARGZ_DIGEST: "sha256:" + "a" * 64}
    await layers.restore({4: ("/x", live)})
    assert sorted(os.listdir(tocs)) == ["4.json"]  # snapshot 4 is still remote


async def test_a_hostile_toc_is_refused_and_its_mount_undone(
        tmp_path: Path, setup: tuple[LazyLayers, FakeManager, FakeRegistry]) -> None:
    from snapshotter.errdefs import RemoteLayerError

    layers, manager, registry = setup
    built = ew.build_estargz([ew.reg("../../escape", b"x" * 10)])
    digest = registry.put_blob(REPO, built.blob)
    labels = {L.TARGET_REF: "sha256:" + "d" * 64, L.STARGZ_REFERENCE: f"{registry.host}/{REPO}:1",
              L.STARGZ_DIGEST: digest, L.TOC_DIGEST: built.toc_digest}
    with pytest.raises(RemoteLayerError) as refused:
        await layers.mount(9, mountpoint(tmp_path, 9), labels)
    assert refused.value.reason == "invalid_toc"
    assert 9 not in manager.mounted  # the fake daemon accepted it; the check undid it
    assert not (Path(layers.config.toc_dir) / "9.json").exists()
