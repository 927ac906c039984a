"""Usage (live for active snapshots, stored at Commit otherwise) and Cleanup (removes
directories no record names, keeps everything else)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc

from .conftest import Mounter, Service, Snap, rpc_error, snapshot_id

BIG = 256 * 1024


def _fill(root: Path) -> int:
    """Write one big file and a few small entries; return how many entries were made."""
    (root / "big").write_bytes(b"\1" * BIG)
    (root / "d1").mkdir()
    (root / "d1" / "small").write_bytes(b"x")
    (root / "d2").mkdir()
    (root / "d2" / "link").symlink_to("../big")
    return 5


def test_usage_of_active_is_live(snap: Snap, mounter: Mounter, work: Path) -> None:
    mounter.mount_all(snap.prepare("a"), work / "a")
    size0, inodes0 = snap.usage("a")
    entries = _fill(work / "a")
    size, inodes = snap.usage("a")
    assert size >= size0 + BIG
    assert inodes >= inodes0 + entries


def test_usage_of_committed_is_kept(snap: Snap, mounter: Mounter, work: Path) -> None:
    mounter.mount_all(snap.prepare("a"), work / "a")
    entries = _fill(work / "a")
    mounter.unmount(work / "a")
    before = snap.usage("a")
    snap.commit("c", "a")
    size, inodes = snap.usage("c")
    assert (size, inodes) == before
    assert size >= BIG
    assert inodes >= entries


def test_usage_counts_only_the_snapshot_own_layer(snap: Snap, mounter: Mounter, work: Path) -> None:
    mounter.mount_all(snap.prepare("a"), work / "a")
    _fill(work / "a")
    mounter.unmount(work / "a")
    snap.commit("c", "a")
    mounter.mount_all(snap.prepare("child", "c"), work / "child")
    (work / "child" / "tiny").write_bytes(b"t")
    assert snap.usage("child")[0] < BIG
    snap.view("v", "c")
    assert snap.usage("v")[0] < BIG


def test_usage_of_unknown(snap: Snap) -> None:
    assert "nope" in rpc_error(grpc.StatusCode.NOT_FOUND, lambda: snap.usage("nope"))


# --- cleanup ------------------------------------------------------------------------------


def _orphan(service: Service, name: str) -> Path:
    path = service.root / "snapshots" / name
    (path / "fs" / "sub").mkdir(parents=True)
    (path / "fs" / "sub" / "file").write_bytes(b"orphan")
    (path / "work").mkdir()
    return path


def _root_entries(service: Service) -> list[str]:
    """ROOT's entries apart from the metastore's files (sqlite's -wal/-shm come and go)."""
    return sorted(p.name for p in service.root.iterdir() if not p.name.startswith("metadata.db"))


def test_cleanup_removes_orphans_only(
    snap: Snap, service: Service, mounter: Mounter, work: Path
) -> None:
    snap.prepare("c-a")
    snap.commit("c", "c-a")
    mounter.mount_all(snap.prepare("a", "c"), work / "a")
    (work / "a" / "keep").write_bytes(b"keep")
    snap.view("v")
    live = service.snapshot_dirs()
    orphans = [_orphan(service, n) for n in ("987654", "new-123456", "not-a-number")]
    root_entries = _root_entries(service)

    snap.cleanup()

    assert not any(o.exists() for o in orphans)
    assert service.snapshot_dirs() == live
    assert _root_entries(service) == root_entries
    assert (service.root / "metadata.db").is_file()
    assert (work / "a" / "keep").read_bytes() == b"keep"
    assert snap.names() == ["a", "c", "v"]
    snap.cleanup()
    assert service.snapshot_dirs() == live


def test_removed_snapshot_directory_is_gone_after_cleanup(snap: Snap, service: Service) -> None:
    mounts = snap.prepare("a")
    ident = snapshot_id(mounts[0].source, service.root)
    snap.remove("a")
    snap.cleanup()
    assert ident not in service.snapshot_dirs()
    assert service.snapshot_dirs() == set()


def test_cleanup_unmounts_a_mounted_orphan(snap: Snap, service: Service) -> None:
    """stargz asks the filesystem to unmount ``<dir>/fs`` before removing an orphan (a
    remote layer left mounted by a crash looks like this)."""
    orphan = _orphan(service, "424242")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(orphan / "fs")], check=True)
    (orphan / "fs" / "inside").write_bytes(b"x")
    snap.cleanup()
    assert not orphan.exists()
    with open("/proc/self/mountinfo") as f:
        assert str(orphan) not in f.read()


def test_cleanup_on_empty_root(snap: Snap, service: Service) -> None:
    snap.cleanup()
    snap.cleanup()
    assert snap.infos() == []
