"""Hot paths of Local/RemoteSnapshotter: disk usage on or off the event loop, Mounts with
its parent chain and the remote health check, without gRPC."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from snapshotter import config as C
from snapshotter import labels as L
from snapshotter.errdefs import FailedPrecondition, NotFound, Unavailable
from snapshotter.metastore.store import MetaStore
from snapshotter.model import Kind, Mount
from snapshotter.snapshot import local
from snapshotter.snapshot.local import disk_usage, usage_of
from snapshotter.snapshot.remote import RemoteSnapshotter


def _tree(root: Path, files: int) -> None:
    (root / "d").mkdir(parents=True)
    for i in range(files):
        (root / "d" / f"f{i}").write_bytes(b"x" * (i * 100))
    os.link(root / "d" / "f1", root / "hardlink")


@pytest.mark.parametrize("files", [3, local.INLINE_USAGE_ENTRIES * 2])
async def test_usage_of_small_and_big_trees_equals_disk_usage(
    tmp_path: Path, files: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path, files)
    threaded: list[str] = []

    async def to_thread(fn: object, path: str) -> object:
        threaded.append(path)
        return disk_usage(path)

    monkeypatch.setattr("snapshotter.snapshot.local.asyncio.to_thread", to_thread)
    got = await usage_of(str(tmp_path))
    assert got == disk_usage(str(tmp_path))
    assert got.inodes == files + 2  # root, d, the files; the hard link counted once
    assert bool(threaded) == (files + 3 > local.INLINE_USAGE_ENTRIES)


class _FakeRemoteFS:
    def __init__(self) -> None:
        self.down: set[int] = set()
        self.checked: list[int] = []

    async def mount(self, sid: int, mountpoint: str, labels: Mapping[str, str]) -> str:
        raise AssertionError("not used")

    def check(self, sid: int) -> None:
        self.checked.append(sid)
        if sid in self.down:
            raise Unavailable("daemon down")

    async def unmount(self, sid: int) -> None:
        return None

    async def restore(self, remote: dict[int, tuple[str, Mapping[str, str]]]) -> None:
        return None


async def test_mounts_walk_the_chain_and_check_remote_parents(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "metadata.db")
    fs = _FakeRemoteFS()
    sn = RemoteSnapshotter(C.parse(f'root = "{tmp_path}"\n'), store, fs)
    remote = {L.REMOTE: L.REMOTE_VALUE}
    await sn.prepare("b", "", {})
    await sn.commit("base", "b", remote)
    await sn.prepare("m", "base", {})
    await sn.commit("mid", "m", {})
    base, mid = (await sn.stat("base"), await sn.stat("mid"))
    base_id, mid_id = store.reader().must_get("base").id, store.reader().must_get("mid").id
    assert (base.kind, mid.kind) == (Kind.COMMITTED, Kind.COMMITTED)
    assert await sn.prepare("top", "mid", {}) == [Mount("overlay", "overlay", (
        *sn.overlay_options, f"workdir={sn.work_of(3)}", f"upperdir={sn.fs_of(3)}",
        f"lowerdir={sn.fs_of(mid_id)}:{sn.fs_of(base_id)}"))]
    top = await sn.mounts("top")
    assert top[0].options[-1] == f"lowerdir={sn.fs_of(mid_id)}:{sn.fs_of(base_id)}"
    assert fs.checked[-1:] == [base_id]  # only the remote parent is checked
    assert str(tmp_path / "snapshots" / "3" / "fs") == sn.fs_of(3)
    fs.down.add(base_id)
    with pytest.raises(Unavailable, match="'base' unavailable"):
        await sn.mounts("top")
    with pytest.raises(NotFound):
        await sn.mounts("missing")
    with pytest.raises(FailedPrecondition):
        await sn.mounts("mid")
    assert await sn.prepare("solo", "", {}) == [Mount("bind", sn.fs_of(4), ("rw", "rbind"))]
    assert await sn.mounts("solo") == [Mount("bind", sn.fs_of(4), ("rw", "rbind"))]
    store.close()
