"""Stat, List (with containerd filters) and Update (with field masks) over every kind of
snapshot, with containerd-style keys and labels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

from .conftest import GC_ROOT, Mounter, Service, Snap

REF = "containerd.io/snapshot.ref"
KEY_1 = "default/12/extract-123456789-AbCd sha256:1111111111111111111111111111111111111111"
NAME_1 = "default/13/sha256:1111111111111111111111111111111111111111"
KEY_2 = "default/14/extract-987654321-Zz_- sha256:2222222222222222222222222222222222222222"
NAME_2 = "default/15/sha256:2222222222222222222222222222222222222222"


def _ns(ts: Any) -> int:
    return int(ts.ToNanoseconds())


@pytest.fixture(scope="module")
def kinds(module_service: Service) -> Snap:
    """committed c0 (label tier=base), committed c1 on c0, active a0 (no parent),
    active a1 on c1 (label tier=top), view v0 (no parent), view v1 on c1. Shared by the
    read-only tests of this module."""
    snap = Snap(module_service.stub)
    snap.prepare("c0-a")
    snap.commit("c0", "c0-a", {"tier": "base", "containerd.io/snapshot/x": "1"})
    snap.prepare("c1-a", "c0")
    snap.commit("c1", "c1-a")
    snap.prepare("a0")
    snap.prepare("a1", "c1", {"tier": "top", "with space": "a b"})
    snap.view("v0")
    snap.view("v1", "c1", {"tier": "view"})
    return snap


ALL = ["a0", "a1", "c0", "c1", "v0", "v1"]


@pytest.mark.parametrize(
    ("name", "kind", "parent", "labels"),
    [
        ("c0", pb.COMMITTED, "", {"tier": "base", "containerd.io/snapshot/x": "1"}),
        ("c1", pb.COMMITTED, "c0", GC_ROOT),
        ("a0", pb.ACTIVE, "", GC_ROOT),
        ("a1", pb.ACTIVE, "c1", {"tier": "top", "with space": "a b"}),
        ("v0", pb.VIEW, "", GC_ROOT),
        ("v1", pb.VIEW, "c1", {"tier": "view"}),
    ],
)
def test_stat_every_kind(
    kinds: Snap, name: str, kind: int, parent: str, labels: dict[str, str]
) -> None:
    info = kinds.stat(name)
    assert (info.name, info.kind, info.parent, dict(info.labels)) == (name, kind, parent, labels)
    assert _ns(info.created_at) > 0
    assert info.created_at == info.updated_at


def test_list_equals_stat(kinds: Snap) -> None:
    infos = kinds.infos()
    assert sorted(i.name for i in infos) == ALL
    for info in infos:
        assert kinds.stat(info.name) == info


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (["kind==active"], ["a0", "a1"]),
        (["kind==view"], ["v0", "v1"]),
        (["kind==committed"], ["c0", "c1"]),
        (["kind!=committed"], ["a0", "a1", "v0", "v1"]),
        (["kind==active", "kind==view"], ["a0", "a1", "v0", "v1"]),
        (["kind==committed", "name==a1", "labels.tier==view"], ["a1", "c0", "c1", "v1"]),
        (["parent==c1"], ["a1", "v1"]),
        (["parent"], ALL),  # containerd's adaptor: parent is always present
        (['parent==""'], ["a0", "c0", "v0"]),
        (['parent!=""'], ["a1", "c1", "v1"]),
        (["labels.tier"], ["a1", "c0", "v1"]),
        (["labels.tier~=^(base|top)$"], ["a1", "c0"]),
        (["labels.tier~=/^t/"], ["a1"]),
        (['labels."with space"=="a b"'], ["a1"]),
        (['labels."containerd.io/snapshot/x"==1'], ["c0"]),
        (["name~=^[av]"], ["a0", "a1", "v0", "v1"]),
        (["name~=0$,kind!=view"], ["a0", "c0"]),
        (["name==nothing"], []),
        ([""], ALL),
        (["", "name==nothing"], ALL),
        ([], ALL),
    ],
)
def test_list_filters(kinds: Snap, filters: list[str], expected: list[str]) -> None:
    assert kinds.names(*filters) == sorted(expected)


def test_keys_with_slashes_and_spaces(snap: Snap, mounter: Mounter, work: Path) -> None:
    """The keys and names containerd's metadata layer sends (protocol-reference §1.5)."""
    mounter.mount_all(snap.prepare(KEY_1, "", {REF: NAME_1}), work / "m1")
    (work / "m1" / "f").write_bytes(b"1")
    mounter.unmount(work / "m1")
    snap.commit(NAME_1, KEY_1, {REF: NAME_1})
    mounter.mount_all(snap.prepare(KEY_2, NAME_1, {REF: NAME_2}), work / "m2")
    assert (work / "m2" / "f").read_bytes() == b"1"
    mounter.unmount(work / "m2")
    snap.commit(NAME_2, KEY_2, {REF: NAME_2})

    assert snap.stat(NAME_2).parent == NAME_1
    remote_filter = f'labels."{REF}"=={NAME_2},parent=="{NAME_1}"'
    assert snap.names(remote_filter) == [NAME_2]
    assert snap.names(f'labels."{REF}"=={NAME_2},parent=="{NAME_2}"') == []
    assert snap.names(f'name=="{NAME_1}"', f'name=="{NAME_2}"') == sorted([NAME_1, NAME_2])
    snap.view("default/16/view with spaces ünïcode ✓", NAME_2)
    assert snap.stat("default/16/view with spaces ünïcode ✓").kind == pb.VIEW


def test_remote_lookup_filter(snap: Snap) -> None:
    """containerd's metadata layer looks up the committed target with this filter after
    ALREADY_EXISTS (and then keeps only COMMITTED results): the filter must select by
    label and parent, whatever the kind."""
    target = "sha256:abc"
    snap.prepare("default/2/base-a")
    snap.commit("default/3/sha256:def", "default/2/base-a")
    snap.prepare("default/4/extract-1-AbCd sha256:abc", "default/3/sha256:def", {REF: target})
    infos = snap.infos(f'labels."{REF}"=={target},parent=="default/3/sha256:def"')
    assert [(i.name, i.kind) for i in infos] == [("default/4/extract-1-AbCd sha256:abc", pb.ACTIVE)]
    snap.commit(target, "default/4/extract-1-AbCd sha256:abc", {REF: target})
    infos = snap.infos(f'labels."{REF}"=={target},parent=="default/3/sha256:def"')
    assert [(i.name, i.kind, dict(i.labels)) for i in infos] == [
        (target, pb.COMMITTED, {REF: target})
    ]


def test_key_that_looks_like_a_path_stays_inside_root(snap: Snap, service: Service) -> None:
    before = sorted(p.name for p in service.base.iterdir())
    snap.prepare("../../../escape")
    snap.commit("../../escape-committed", "../../../escape")
    snap.view("/etc/passwd", "../../escape-committed")
    assert sorted(p.name for p in service.base.iterdir()) == before
    assert snap.names() == sorted(["../../escape-committed", "/etc/passwd"])


def test_list_streams_more_than_one_batch(snap: Snap) -> None:
    names = [f"many-{i:03d}" for i in range(250)]
    for name in names:
        snap.view(name, "", {"i": name})
    assert snap.names() == names
    assert snap.names("name~=^many-1") == [n for n in names if n.startswith("many-1")]


# --- commit and update label semantics ----------------------------------------------------


def test_commit_replaces_labels(snap: Snap) -> None:
    snap.prepare("a", "", {"from-prepare": "1", "shared": "prepare"})
    snap.commit("c", "a", {"from-commit": "2", "shared": "commit"})
    assert dict(snap.stat("c").labels) == {"from-commit": "2", "shared": "commit"}
    snap.prepare("b", "", {"x": "y"})
    snap.commit("d", "b", {})
    assert dict(snap.stat("d").labels) == {}


def test_commit_fresh_timestamps(snap: Snap) -> None:
    snap.prepare("a")
    created = _ns(snap.stat("a").created_at)
    t0 = time.time_ns() // 10**9 * 10**9
    snap.commit("c", "a")
    info = snap.stat("c")
    assert _ns(info.created_at) >= max(created, t0)
    assert info.created_at == info.updated_at


def _updated(snap: Snap, labels: dict[str, str], *paths: str) -> tuple[dict[str, str], Any]:
    snap.prepare("s", "", BEFORE)
    info = pb.Info(name="s", labels=labels)
    returned = snap.update(info, *paths)
    stored = snap.stat("s")
    assert returned == stored
    return dict(stored.labels), stored


BEFORE = {"keep": "1", "change": "old", "drop": "x"}


@pytest.mark.parametrize(
    ("labels", "paths", "expected"),
    [
        ({"new": "n"}, (), {"new": "n"}),
        ({"new": "n"}, ("labels",), {"new": "n"}),
        ({}, ("labels",), {}),
        ({"change": "new", "new": "ignored"}, ("labels.change",), {**BEFORE, "change": "new"}),
        ({"new": "n"}, ("labels.new",), {**BEFORE, "new": "n"}),
        ({}, ("labels.drop",), {"keep": "1", "change": "old"}),
        ({"drop": ""}, ("labels.drop",), {"keep": "1", "change": "old"}),
        ({"a.b": "dotted"}, ("labels.a.b",), {**BEFORE, "a.b": "dotted"}),
        (
            {"change": "c", "drop": "d"},
            ("labels.change", "labels.drop"),
            {"keep": "1", "change": "c", "drop": "d"},
        ),
        ({"x": "", "y": "1"}, (), {"y": "1"}),
    ],
)
def test_update_masks(
    snap: Snap, labels: dict[str, str], paths: tuple[str, ...], expected: dict[str, str]
) -> None:
    stored, _ = _updated(snap, labels, *paths)
    assert stored == expected


def test_update_ignores_immutable_fields_without_mask(snap: Snap) -> None:
    snap.prepare("p-a")
    snap.commit("p", "p-a")
    snap.view("s", "p", {"a": "1"})
    before = snap.stat("s")
    info = pb.Info(name="s", parent="other", kind=pb.COMMITTED, labels={"b": "2"})
    after = snap.update(info)
    assert (after.name, after.parent, after.kind) == ("s", "p", pb.VIEW)
    assert after.created_at == before.created_at
    assert _ns(after.updated_at) >= _ns(before.updated_at)
    assert dict(after.labels) == {"b": "2"}


def test_empty_label_values_are_not_stored(snap: Snap) -> None:
    snap.prepare("a", "", {"empty": "", "full": "1"})
    assert dict(snap.stat("a").labels) == {"full": "1"}
    assert snap.names("labels.empty") == []
