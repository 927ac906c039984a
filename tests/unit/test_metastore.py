"""The metastore's transactional contract."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StartupError,
)
from snapshotter.metastore.schema import SCHEMA_VERSION
from snapshotter.metastore.store import MetaStore
from snapshotter.model import Kind


@pytest.fixture
def store(tmp_path: Path) -> MetaStore:
    return MetaStore(tmp_path / "metadata.db")


def test_wal_and_schema_version(store: MetaStore) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    MetaStore(tmp_path / "m.db").close()
    conn = sqlite3.connect(tmp_path / "m.db")
    conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    conn.commit()
    with pytest.raises(StartupError, match="schema version 999"):
        MetaStore(tmp_path / "m.db")


def test_chain_and_commit_keeps_id(store: MetaStore) -> None:
    with store.write() as tx:
        a = tx.create("a", "", Kind.ACTIVE, {"x": "1"}, 10)
        c = tx.commit("a", "base", {"y": "2"}, 100, 3, 20)
        assert c.id == a.id and c.labels == {"y": "2"} and c.size == 100
        b = tx.create("b", "base", Kind.ACTIVE, {}, 30)
        tx.commit("b", "mid", {}, 0, 0, 40)
        top = tx.create("top", "mid", Kind.VIEW, {}, 50)
        assert [p.key for p in tx.parents(top)] == ["mid", "base"]
        assert b.parent == "base"


def test_errors(store: MetaStore) -> None:
    with store.write() as tx:
        tx.create("a", "", Kind.ACTIVE, {}, 1)
    with pytest.raises(AlreadyExists), store.write() as tx:
        tx.create("a", "", Kind.ACTIVE, {}, 1)
    with pytest.raises(NotFound), store.write() as tx:
        tx.create("b", "missing", Kind.ACTIVE, {}, 1)
    with pytest.raises(InvalidArgument, match="not a committed"), store.write() as tx:
        tx.create("b", "a", Kind.ACTIVE, {}, 1)
    with store.write() as tx:
        tx.create("v", "", Kind.VIEW, {}, 1)
    with pytest.raises(FailedPrecondition), store.write() as tx:
        tx.commit("v", "x", {}, 0, 0, 1)
    with store.write() as tx:
        tx.commit("a", "c", {}, 0, 0, 1)
        tx.create("child", "c", Kind.ACTIVE, {}, 1)
    with pytest.raises(FailedPrecondition, match="children"), store.write() as tx:
        tx.remove("c")
    with pytest.raises(InvalidArgument, match="only labels"), store.write() as tx:
        tx.update_labels("c", {}, ["name"], 1)


def test_rollback_on_error(store: MetaStore) -> None:
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.create("a", "", Kind.ACTIVE, {}, 1)
        raise RuntimeError("disk full")
    with store.read() as tx:
        assert tx.get("a") is None


def test_update_field_paths(store: MetaStore) -> None:
    with store.write() as tx:
        tx.create("a", "", Kind.ACTIVE, {"k1": "v1", "k2": "v2"}, 1)
        assert tx.update_labels("a", {"k1": "n1", "k3": "n3"}, ["labels.k1"], 2).labels == {
            "k1": "n1", "k2": "v2"}
        assert tx.update_labels("a", {}, ["labels.k2"], 3).labels == {"k1": "n1"}
        r = tx.update_labels("a", {"only": "this"}, [], 4)
        assert r.labels == {"only": "this"} and r.updated_ns == 4 and r.created_ns == 1


def test_ids_are_never_reused(store: MetaStore) -> None:
    with store.write() as tx:
        first = tx.create("a", "", Kind.ACTIVE, {}, 1).id
        tx.remove("a")
        assert tx.create("a", "", Kind.ACTIVE, {}, 1).id > first
