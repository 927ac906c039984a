"""The mounts the service returns (protocol-reference §3.1 to §3.2), checked field by field
and then by mounting them for real."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

from .conftest import Mounter, Service, Snap, rpc_error, snapshot_id

# containerd's overlay driver may put these first (index=off when the overlay module has
# an "index" parameter; userxattr in user namespaces); nothing else may precede workdir.
ALLOWED_LEADING_OPTIONS = {"index=off", "userxattr"}


def _fs(service: Service, ident: str) -> str:
    return str(service.root / "snapshots" / ident / "fs")


def _work(service: Service, ident: str) -> str:
    return str(service.root / "snapshots" / ident / "work")


def _only(mounts: list[Any]) -> Any:
    assert len(mounts) == 1, mounts
    (m,) = mounts
    assert m.target == "", "Mount.target must stay empty (1.6 proxies drop it)"
    return m


def _bind_id(service: Service, mounts: list[Any], options: list[str]) -> str:
    m = _only(mounts)
    assert (m.type, list(m.options)) == ("bind", options)
    return snapshot_id(m.source, service.root)


def _overlay_options(mounts: list[Any]) -> list[str]:
    m = _only(mounts)
    assert (m.type, m.source) == ("overlay", "overlay")
    options = list(m.options)
    while options and options[0] in ALLOWED_LEADING_OPTIONS:
        options.pop(0)
    return options


def _committed(snap: Snap, service: Service, name: str, parent: str = "") -> str:
    """Commit a fresh snapshot ``name`` on ``parent``; return its directory id."""
    mounts = snap.prepare(f"{name}-a", parent)
    if parent:
        upper = next(o for o in _overlay_options(mounts) if o.startswith("upperdir="))
        ident = snapshot_id(upper.removeprefix("upperdir="), service.root)
    else:
        ident = _bind_id(service, mounts, ["rw", "rbind"])
    snap.commit(name, f"{name}-a")
    return ident


def test_active_without_parent_is_rw_bind_of_own_fs(snap: Snap, service: Service) -> None:
    ident = _bind_id(service, snap.prepare("a"), ["rw", "rbind"])
    base = service.root / "snapshots" / ident
    assert stat.S_IMODE(os.stat(base / "fs").st_mode) == 0o755
    assert (base / "work").is_dir()
    assert (service.root / "metadata.db").is_file()


def test_view_without_parent_is_ro_bind_of_own_fs(snap: Snap, service: Service) -> None:
    ident = _bind_id(service, snap.view("v"), ["ro", "rbind"])
    assert (service.root / "snapshots" / ident / "fs").is_dir()


def test_view_of_one_parent_is_ro_bind_of_parent(snap: Snap, service: Service) -> None:
    parent = _committed(snap, service, "p")
    assert _bind_id(service, snap.view("v", "p"), ["ro", "rbind"]) == parent


def test_commit_keeps_the_directory(snap: Snap, service: Service) -> None:
    ident = _bind_id(service, snap.prepare("a"), ["rw", "rbind"])
    snap.commit("c", "a")
    assert _bind_id(service, snap.view("v", "c"), ["ro", "rbind"]) == ident


def test_active_with_one_parent_is_overlay(snap: Snap, service: Service) -> None:
    parent = _committed(snap, service, "p")
    options = _overlay_options(snap.prepare("a", "p"))
    assert len(options) == 3, options
    work, upper, lower = options
    ident = snapshot_id(upper.removeprefix("upperdir="), service.root)
    assert ident != parent
    assert work == f"workdir={_work(service, ident)}"
    assert upper == f"upperdir={_fs(service, ident)}"
    assert lower == f"lowerdir={_fs(service, parent)}"


def test_active_lowerdir_is_nearest_parent_first(snap: Snap, service: Service) -> None:
    ids = [_committed(snap, service, "l0")]
    for i in range(1, 4):
        ids.append(_committed(snap, service, f"l{i}", f"l{i - 1}"))
    options = _overlay_options(snap.prepare("top", "l3"))
    assert options[2] == "lowerdir=" + ":".join(_fs(service, i) for i in reversed(ids))
    assert len(set(ids)) == 4


def test_view_of_two_parents_is_readonly_overlay(snap: Snap, service: Service) -> None:
    p0 = _committed(snap, service, "p0")
    p1 = _committed(snap, service, "p1", "p0")
    options = _overlay_options(snap.view("v", "p1"))
    assert options == [f"lowerdir={_fs(service, p1)}:{_fs(service, p0)}"]


def test_mounts_repeats_prepare_and_view(snap: Snap, service: Service) -> None:
    _committed(snap, service, "p0")
    _committed(snap, service, "p1", "p0")
    cases = {
        "a0": snap.prepare("a0"),
        "a1": snap.prepare("a1", "p0"),
        "a2": snap.prepare("a2", "p1"),
        "v0": snap.view("v0"),
        "v1": snap.view("v1", "p0"),
        "v2": snap.view("v2", "p1"),
    }
    for key, mounts in cases.items():
        assert snap.mounts(key) == mounts, key


def test_mounts_of_committed_is_failed_precondition(snap: Snap, service: Service) -> None:
    _committed(snap, service, "c")
    details = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, lambda: snap.mounts("c"))
    assert "c" in details


def test_mounts_of_unknown_is_not_found(snap: Snap) -> None:
    details = rpc_error(grpc.StatusCode.NOT_FOUND, lambda: snap.mounts("nope"))
    assert "nope" in details


# --- real mounts ----------------------------------------------------------------------------


def _layered(snap: Snap, mounter: Mounter, work: Path) -> None:
    """p0: /a=0 /only0;  p1 (on p0): /a=1 /only1, removes /only0."""
    mounter.mount_all(snap.prepare("p0-a"), work / "p0")
    (work / "p0" / "a").write_bytes(b"0")
    (work / "p0" / "only0").write_bytes(b"zero")
    mounter.unmount(work / "p0")
    snap.commit("p0", "p0-a")
    mounter.mount_all(snap.prepare("p1-a", "p0"), work / "p1")
    assert (work / "p1" / "a").read_bytes() == b"0"
    (work / "p1" / "a").write_bytes(b"1")
    (work / "p1" / "only1").write_bytes(b"one")
    (work / "p1" / "only0").unlink()
    mounter.unmount(work / "p1")
    snap.commit("p1", "p1-a")


def _contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("how", ["view", "prepare"])
def test_stacked_mount_shows_the_top_layer(
    snap: Snap, mounter: Mounter, work: Path, how: str
) -> None:
    _layered(snap, mounter, work)
    mounts = snap.view("x", "p1") if how == "view" else snap.prepare("x", "p1")
    mounter.mount_all(mounts, work / "x")
    assert _contents(work / "x") == {"a": b"1", "only1": b"one"}


def test_active_writes_land_in_its_own_fs(
    snap: Snap, mounter: Mounter, work: Path, service: Service
) -> None:
    _layered(snap, mounter, work)
    mounts = snap.prepare("x", "p1")
    upper = next(o for o in _overlay_options(mounts) if o.startswith("upperdir="))
    mounter.mount_all(mounts, work / "x")
    (work / "x" / "new").write_bytes(b"new")
    assert Path(upper.removeprefix("upperdir="), "new").read_bytes() == b"new"
    mounter.mount_all(snap.view("v", "p1"), work / "v")
    assert not (work / "v" / "new").exists()


@pytest.mark.parametrize("parent", ["", "p0", "p1"])
def test_views_are_read_only(snap: Snap, mounter: Mounter, work: Path, parent: str) -> None:
    _layered(snap, mounter, work)
    mounter.mount_all(snap.view("v", parent), work / "v")
    with pytest.raises(OSError) as info:
        (work / "v" / "file").write_bytes(b"x")
    assert info.value.errno == errno.EROFS


def test_active_without_parent_is_writable(snap: Snap, mounter: Mounter, work: Path) -> None:
    mounter.mount_all(snap.prepare("a"), work / "a")
    (work / "a" / "file").write_bytes(b"x")
    assert snap.stat("a").kind == pb.ACTIVE
