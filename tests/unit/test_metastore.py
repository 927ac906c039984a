"""The metastore's transactional contract."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
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


def churn(store: MetaStore, count: int, pause_every: int = 0) -> None:
    """Create and remove ``count`` snapshots; with ``pause_every``, wait for the running
    checkpoint after that many (an API client's pauses, in test time)."""
    for i in range(count):
        with store.write() as tx:
            tx.create(f"k{i}", "", Kind.ACTIVE, {"l": "v" * 200}, i)
        with store.write() as tx:
            tx.remove(f"k{i}")
        if pause_every and i % pause_every == pause_every - 1:
            store.wait_checkpoint()


def test_checkpoints_run_in_the_background_and_keep_the_log_small(tmp_path: Path) -> None:
    """The writer does not checkpoint every 1000 pages any more (sqlite's default); the
    store's background checkpoints let the log start over after each pause."""
    store = MetaStore(tmp_path / "m.db", checkpoint_every=20)
    assert store._c.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
    churn(store, 600, pause_every=10)
    checkpointed = (tmp_path / "m.db-wal").stat().st_size  # the log's high-water mark
    never = MetaStore(tmp_path / "n.db", checkpoint_every=1 << 30)
    churn(never, 600)
    unbounded = (tmp_path / "n.db-wal").stat().st_size
    assert checkpointed < unbounded // 10, (checkpointed, unbounded)
    with store.read() as tx:  # nothing lost on the way
        assert tx.get("k599") is None
    store.close()
    never.close()


def test_a_failed_checkpoint_is_logged_and_harmless(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    store = MetaStore(tmp_path / "m.db", checkpoint_every=1)
    store.wait_checkpoint()
    store.path = tmp_path / "missing-dir" / "m.db"  # the checkpoint's connection fails
    with store.write() as tx:
        tx.create("a", "", Kind.ACTIVE, {}, 1)
    store.wait_checkpoint()
    assert "metastore checkpoint failed" in caplog.text
    with store.read() as tx:
        assert tx.must_get("a").key == "a"
    store.close()


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


def test_records_returned_by_create_and_commit_read_back_the_same(store: MetaStore) -> None:
    with store.write() as tx:
        a = tx.create("a", "", Kind.ACTIVE, {"z": "1", "empty": "", "b": "2"}, 10)
        assert a == tx.must_get("a") and list(a.labels) == ["b", "z"]
        c = tx.commit("a", "base", {"y": "2", "gone": ""}, 100, 3, 20)
        assert c == tx.must_get("base")
        child = tx.create("child", "base", Kind.VIEW, {}, 30)
        assert child == tx.must_get("child") and child.parent == "base"


def test_parents_of_a_deep_chain_and_reader(store: MetaStore) -> None:
    parent = ""
    with store.write() as tx:
        for i in range(12):
            tx.create(f"a{i}", parent, Kind.ACTIVE, {"i": str(i)}, i)
            tx.commit(f"a{i}", f"c{i}", {"i": str(i)}, i, i, i)
            parent = f"c{i}"
        top = tx.create("top", parent, Kind.ACTIVE, {}, 99)
    reader = store.reader()
    got = reader.parents(top)
    assert [p.key for p in got] == [f"c{i}" for i in reversed(range(12))]
    assert got == [reader.must_get(p.key) for p in got]
    assert reader.parents(reader.must_get("c0")) == []


def test_dangling_parent_is_internal(store: MetaStore) -> None:
    with store.write() as tx:
        tx.create("a", "", Kind.ACTIVE, {}, 1)
        tx.commit("a", "base", {}, 0, 0, 1)
        tx.create("mid-a", "base", Kind.ACTIVE, {}, 1)
        tx.commit("mid-a", "mid", {}, 0, 0, 1)
        top = tx.create("top", "mid", Kind.ACTIVE, {}, 1)
    conn = sqlite3.connect(store.path)
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("DELETE FROM snapshots WHERE key = 'base'")
    conn.commit()
    conn.close()
    with pytest.raises(Internal, match="dangling parent id"):
        store.reader().parents(top)
    with pytest.raises(Internal, match="dangling parent id"):
        store.reader().parents(store.reader().must_get("mid"))
