"""The error contract (protocol-reference §1.6, containerd's bolt storage): every bad
request gets the right gRPC code, a message naming what was wrong, and leaves no
directory or record behind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import pytest

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

from .conftest import Service, Snap, rpc_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@contextlib.contextmanager
def unchanged(service: Service, snap: Snap) -> Iterator[None]:
    """Assert that the block changes neither the records nor ``ROOT/snapshots``."""
    infos, dirs = snap.infos(), service.snapshot_dirs()
    yield
    assert snap.infos() == infos
    assert service.snapshot_dirs() == dirs


@pytest.fixture
def chain(snap: Snap) -> None:
    """committed ``c``; active ``a`` on ``c``; view ``v`` on ``c``."""
    snap.prepare("c-a")
    snap.commit("c", "c-a")
    snap.prepare("a", "c")
    snap.view("v", "c")


# --- parents --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prepare", "view"])
@pytest.mark.parametrize("parent", ["a", "v"])
def test_parent_not_committed(
    snap: Snap, service: Service, chain: None, method: str, parent: str
) -> None:
    call = getattr(snap, method)
    with unchanged(service, snap):
        details = rpc_error(INVALID, lambda: call("new", parent))
    assert parent in details


@pytest.mark.parametrize("method", ["prepare", "view"])
def test_missing_parent(snap: Snap, service: Service, chain: None, method: str) -> None:
    call = getattr(snap, method)
    with unchanged(service, snap):
        details = rpc_error(NOT_FOUND, lambda: call("new", "no-such-parent"))
    assert "no-such-parent" in details


# --- existing keys and names ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["prepare", "view"])
@pytest.mark.parametrize("key", ["a", "v", "c"])
def test_key_exists(snap: Snap, service: Service, chain: None, method: str, key: str) -> None:
    call = getattr(snap, method)
    with unchanged(service, snap):
        details = rpc_error(EXISTS, lambda: call(key, ""))
    assert key in details


@pytest.mark.parametrize("name", ["c", "a", "v"])
def test_commit_to_existing_name(snap: Snap, service: Service, chain: None, name: str) -> None:
    snap.prepare("b", "c")
    with unchanged(service, snap):
        details = rpc_error(EXISTS, lambda: snap.commit(name, "b"))
    assert name in details
    assert snap.stat("b").kind == pb.ACTIVE
    assert snap.mounts("b")


def test_commit_to_its_own_key(snap: Snap, service: Service, chain: None) -> None:
    with unchanged(service, snap):
        rpc_error(EXISTS, lambda: snap.commit("a", "a"))


@pytest.mark.parametrize("key", ["v", "c"])
def test_commit_of_non_active(snap: Snap, service: Service, chain: None, key: str) -> None:
    with unchanged(service, snap):
        details = rpc_error(PRECONDITION, lambda: snap.commit("new", key))
    assert key in details


def test_commit_of_unknown_key(snap: Snap, service: Service, chain: None) -> None:
    with unchanged(service, snap):
        details = rpc_error(NOT_FOUND, lambda: snap.commit("new", "nope"))
    assert "nope" in details


# --- remove -------------------------------------------------------------------------------


def test_remove_unknown(snap: Snap, service: Service, chain: None) -> None:
    with unchanged(service, snap):
        details = rpc_error(NOT_FOUND, lambda: snap.remove("nope"))
    assert "nope" in details


@pytest.mark.parametrize("child", ["active", "view", "committed"])
def test_remove_with_children(snap: Snap, service: Service, child: str) -> None:
    snap.prepare("p-a")
    snap.commit("p", "p-a")
    if child == "active":
        snap.prepare("child", "p")
    elif child == "view":
        snap.view("child", "p")
    else:
        snap.prepare("child-a", "p")
        snap.commit("child", "child-a")
    with unchanged(service, snap):
        details = rpc_error(PRECONDITION, lambda: snap.remove("p"))
    assert "p" in details
    snap.remove("child")
    snap.remove("p")
    assert snap.infos() == []


def test_remove_twice(snap: Snap, service: Service) -> None:
    snap.prepare("a")
    snap.remove("a")
    rpc_error(NOT_FOUND, lambda: snap.remove("a"))


# --- unknown keys elsewhere -----------------------------------------------------------------


def test_stat_usage_update_unknown(snap: Snap, service: Service, chain: None) -> None:
    with unchanged(service, snap):
        assert "nope" in rpc_error(NOT_FOUND, lambda: snap.stat("nope"))
        assert "nope" in rpc_error(NOT_FOUND, lambda: snap.usage("nope"))
        info = pb.Info(name="nope", labels={"x": "y"})
        assert "nope" in rpc_error(NOT_FOUND, lambda: snap.update(info))
        assert "nope" in rpc_error(NOT_FOUND, lambda: snap.update(info, "labels.x"))


# --- empty keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prepare", "view"])
def test_empty_key(snap: Snap, service: Service, chain: None, method: str) -> None:
    call = getattr(snap, method)
    with unchanged(service, snap):
        details = rpc_error(INVALID, lambda: call("", ""))
        rpc_error(INVALID, lambda: call("", "c"))
    assert "key" in details.lower()


def test_commit_with_empty_name(snap: Snap, service: Service, chain: None) -> None:
    with unchanged(service, snap):
        details = rpc_error(INVALID, lambda: snap.commit("", "a"))
    assert "name" in details.lower()
    assert snap.stat("a").kind == pb.ACTIVE


# --- label size ---------------------------------------------------------------------------

TOO_BIG = {"k": "x" * 4096}  # key + value = 4097 bytes
TOO_BIG_UTF8 = {"k": "é" * 2048}  # 2049 characters, 4097 bytes


@pytest.mark.parametrize("labels", [TOO_BIG, TOO_BIG_UTF8, {"k" * 4097: ""}])
@pytest.mark.parametrize("method", ["prepare", "view"])
def test_label_too_big(
    snap: Snap, service: Service, chain: None, method: str, labels: dict[str, str]
) -> None:
    call = getattr(snap, method)
    with unchanged(service, snap):
        details = rpc_error(INVALID, lambda: call("new", "c", labels))
    assert "label" in details.lower()


@pytest.mark.parametrize("method", ["prepare", "view"])
def test_label_of_exactly_4096_bytes(snap: Snap, method: str) -> None:
    labels = {"k": "x" * 4095, "é" * 2047: "yy"}
    getattr(snap, method)("new", "", labels)
    assert dict(snap.stat("new").labels) == labels


def test_commit_label_too_big(snap: Snap, service: Service, chain: None) -> None:
    with unchanged(service, snap):
        details = rpc_error(INVALID, lambda: snap.commit("new", "a", TOO_BIG))
    assert "label" in details.lower()
    assert snap.stat("a").kind == pb.ACTIVE


@pytest.mark.parametrize("paths", [(), ("labels",), ("labels.k",)])
def test_update_label_too_big(
    snap: Snap, service: Service, chain: None, paths: tuple[str, ...]
) -> None:
    before = dict(snap.stat("a").labels)
    info = pb.Info(name="a", labels=TOO_BIG)
    with unchanged(service, snap):
        details = rpc_error(INVALID, lambda: snap.update(info, *paths))
    assert "label" in details.lower()
    assert dict(snap.stat("a").labels) == before


# --- update masks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["parent", "name", "kind", "created_at", "updated_at", "labelsx", "bogus"]
)
def test_update_with_immutable_or_unknown_path(
    snap: Snap, service: Service, chain: None, path: str
) -> None:
    info = pb.Info(name="a", parent="c", kind=pb.ACTIVE, labels={"x": "y"})
    with unchanged(service, snap):
        details = rpc_error(INVALID, lambda: snap.update(info, path))
    assert path in details


def test_update_mask_error_is_atomic(snap: Snap, service: Service, chain: None) -> None:
    info = pb.Info(name="a", labels={"x": "y"})
    with unchanged(service, snap):
        rpc_error(INVALID, lambda: snap.update(info, "labels.x", "parent"))


# --- filters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "position"),
    [
        (["name=="], 6),
        (["name==c", "kind=active"], 4),
        (['labels."unterminated==x'], 7),
        (["name~=("], 6),
        (["name==c,"], 8),
    ],
)
def test_malformed_filter(
    snap: Snap, service: Service, chain: None, filters: list[str], position: int
) -> None:
    details = rpc_error(INVALID, lambda: snap.infos(*filters))
    assert f"position {position}" in details
