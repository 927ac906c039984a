"""Mount construction follows containerd's overlay rules (protocol-reference §3.2)."""

from __future__ import annotations

import pytest

from snapshotter.model import Kind, Mount
from snapshotter.snapshot.mounts import snapshot_mounts


def test_active_without_parent_is_rw_bind() -> None:
    assert snapshot_mounts(Kind.ACTIVE, "/r/1/fs", "/r/1/work", []) == [
        Mount("bind", "/r/1/fs", ("rw", "rbind"))]


def test_view_without_parent_is_ro_bind() -> None:
    assert snapshot_mounts(Kind.VIEW, "/r/1/fs", "/r/1/work", []) == [
        Mount("bind", "/r/1/fs", ("ro", "rbind"))]


def test_view_of_one_parent_binds_the_parent() -> None:
    assert snapshot_mounts(Kind.VIEW, "/r/2/fs", "/r/2/work", ["/r/1/fs"]) == [
        Mount("bind", "/r/1/fs", ("ro", "rbind"))]


def test_active_with_parents_is_overlay_nearest_first() -> None:
    got = snapshot_mounts(Kind.ACTIVE, "/r/3/fs", "/r/3/work", ["/r/2/fs", "/r/1/fs"],
                          ("index=off",))
    assert got == [Mount("overlay", "overlay", (
        "index=off", "workdir=/r/3/work", "upperdir=/r/3/fs", "lowerdir=/r/2/fs:/r/1/fs"))]


def test_view_of_two_parents_is_readonly_overlay() -> None:
    got = snapshot_mounts(Kind.VIEW, "/r/3/fs", "/r/3/work", ["/r/2/fs", "/r/1/fs"])
    assert got == [Mount("overlay", "overlay", ("lowerdir=/r/2/fs:/r/1/fs",))]


def test_committed_has_no_mounts() -> None:
    with pytest.raises(ValueError):
        snapshot_mounts(Kind.COMMITTED, "/r/1/fs", "/r/1/work", [])
