"""The metastore: sqlite in WAL mode, the single source of truth about snapshots.

Every change happens in an explicit transaction (``with store.write() as tx:``, which
takes sqlite's write lock up front with ``BEGIN IMMEDIATE``); reads use ``store.read()``.
Rows hold a numeric id (never reused: AUTOINCREMENT), the key, the parent's id, the
kind, labels (JSON), timestamps in ns, and the stored usage. The snapshot directory on
disk is named by the id, so a committed snapshot keeps its directory.

Contract of the mutating calls (they mirror containerd's bolt storage):
  * ``create`` raises AlreadyExists (key taken), NotFound (parent missing),
    InvalidArgument (parent not committed);
  * ``commit`` raises NotFound (key missing), FailedPrecondition (not active),
    AlreadyExists (name taken);
  * ``remove`` raises NotFound, FailedPrecondition (has children);
  * ``update_labels`` raises NotFound, InvalidArgument (bad field path).
Labels with an empty value are never stored (as in containerd's bolt storage), so setting
``labels.<k>`` to an empty value deletes the label.
Callers that must do file-system work as part of a change do it inside the ``write()``
block: an exception rolls the transaction back.

Checkpoints: sqlite's automatic WAL checkpoint runs inside whichever commit crosses its
threshold, and with ``synchronous = NORMAL`` that commit then copies the log into the
database and fsyncs it: 5-15 ms (more on a busy disk) taken out of one Snapshots API call
every few hundred writes, on the event loop, where every other call waits too. So the
store moves it out of the way: every ``checkpoint_every`` write transactions it runs a
PASSIVE checkpoint (which never blocks the writer) from a thread of its own with a
connection of its own; once the log is all copied, the next write starts it over. Under
writes without any pause the background checkpoint cannot catch up, so sqlite's own is
kept as a safety valve at ``INLINE_CHECKPOINT_PAGES`` (the log then stays below ~40 MB).
A checkpoint that fails is logged and retried with the next batch; sqlite's recovery
does not depend on checkpoints.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    StartupError,
)
from snapshotter.metastore.schema import SCHEMA_VERSION, migrate
from snapshotter.model import Info, Kind

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    """One snapshot row, with its parent's key resolved."""

    id: int
    key: str
    parent_id: int | None
    parent: str
    kind: Kind
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    size: int = 0
    inodes: int = 0

    def info(self) -> Info:
        return Info(self.key, self.parent, self.kind, self.created_ns, self.updated_ns,
                    dict(self.labels))


_SELECT = (
    "SELECT s.id, s.key, s.parent_id, COALESCE(p.key, ''), s.kind, s.labels, s.created_ns,"
    " s.updated_ns, s.size, s.inodes FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)


# The snapshot with id ``?`` (depth 0) and its ancestors (nearest first), in one
# statement. A dangling parent id ends the chain early, which ``Tx.parents`` detects.
_CHAIN_OF_ID = (
    "WITH RECURSIVE chain(id, depth) AS ("
    " SELECT ?, 0"
    " UNION ALL SELECT s.parent_id, c.depth + 1 FROM chain c JOIN snapshots s ON s.id = c.id"
    " WHERE s.parent_id IS NOT NULL)"
    " SELECT s.id, s.key, s.parent_id, COALESCE(p.key, ''), s.kind, s.labels, s.created_ns,"
    " s.updated_ns, s.size, s.inodes FROM chain c JOIN snapshots s ON s.id = c.id"
    " LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY c.depth"
)


def _stored_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels as stored and read back: empty values dropped (containerd never stores
    those), keys sorted."""
    return {k: labels[k] for k in sorted(labels) if labels[k]}


def _labels_json(labels: Mapping[str, str]) -> str:
    """Serialise labels, dropping empty values: containerd never stores those."""
    return json.dumps(_stored_labels(labels))


_KINDS = {k.value: k for k in Kind}


def _row(row: Sequence[Any]) -> Record:
    # Column types are fixed by the schema (INTEGER / TEXT; parent_id may be NULL).
    sid, key, parent_id, parent, kind, labels, created_ns, updated_ns, size, inodes = row
    return Record(
        id=sid, key=key, parent_id=parent_id, parent=parent, kind=_KINDS[kind],
        labels={} if labels == "{}" else json.loads(labels),
        created_ns=created_ns, updated_ns=updated_ns, size=size, inodes=inodes,
    )


class Tx:
    """Operations inside one transaction. Only valid inside its ``with`` block."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection, for tables owned by other modules (daemon records)."""
        return self._c

    def get(self, key: str) -> Record | None:
        row = self._c.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return None if row is None else _row(row)

    def must_get(self, key: str) -> Record:
        rec = self.get(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return rec

    def records(self) -> list[Record]:
        return [_row(r) for r in self._c.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self._c.execute("SELECT id FROM snapshots")}

    def parents(self, rec: Record) -> list[Record]:
        """The parent chain of ``rec``, nearest parent first, base layer last (one
        statement; none for a snapshot without parent)."""
        if rec.parent_id is None:
            return []
        chain = [_row(r) for r in self._c.execute(_CHAIN_OF_ID, (rec.parent_id,))]
        dangling = chain[-1].parent_id if chain else rec.parent_id
        if dangling is not None:
            raise Internal(f"snapshot {rec.key!r} has a dangling parent id {dangling}")
        return chain

    def has_children(self, sid: int) -> bool:
        row = self._c.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (sid,))
        return row.fetchone() is not None

    def create(
        self, key: str, parent: str, kind: Kind, labels: Mapping[str, str], now_ns: int
    ) -> Record:
        """Insert an active or view snapshot; see the module docstring for errors."""
        if kind is Kind.COMMITTED:
            raise InvalidArgument("cannot create a committed snapshot directly")
        if self.get(key) is not None:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        parent_id = None
        if parent:
            prec = self.get(parent)
            if prec is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            if prec.kind is not Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = prec.id
        stored = _stored_labels(labels)
        cur = self._c.execute(
            "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, kind.value, json.dumps(stored), now_ns, now_ns),
        )
        assert cur.lastrowid is not None
        # The row as it now reads back, without reading it back.
        return Record(id=cur.lastrowid, key=key, parent_id=parent_id, parent=parent,
                      kind=kind, labels=stored, created_ns=now_ns, updated_ns=now_ns)

    def commit(
        self, key: str, name: str, labels: Mapping[str, str], size: int, inodes: int, now_ns: int
    ) -> Record:
        """Turn active ``key`` into committed ``name``; labels are replaced, id kept."""
        rec = self.must_get(key)
        if rec.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is a {rec.kind.value} snapshot, not active")
        if self.get(name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        stored = _stored_labels(labels)
        self._c.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (name, Kind.COMMITTED.value, json.dumps(stored), now_ns,
             now_ns, size, inodes, rec.id),
        )
        # The row as it now reads back, without reading it back.
        return replace(rec, key=name, kind=Kind.COMMITTED, labels=stored, created_ns=now_ns,
                       updated_ns=now_ns, size=size, inodes=inodes)

    def remove(self, key: str) -> Record:
        """Delete ``key``'s record and return it; refuse when it has children."""
        rec = self.must_get(key)
        if self.has_children(rec.id):
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
        self._c.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        return rec

    def update_labels(
        self, key: str, labels: Mapping[str, str], paths: Sequence[str], now_ns: int
    ) -> Record:
        """Apply containerd's Update field-mask rules to the labels of ``key``."""
        rec = self.must_get(key)
        new = dict(rec.labels)
        if not paths:
            new = dict(labels)
        for path in paths:
            if path.startswith("labels."):
                name = path[len("labels."):]
                new[name] = labels.get(name, "")
            elif path == "labels":
                new = dict(labels)
            else:
                raise InvalidArgument(f"cannot update field {path!r} of snapshot {key!r}:"
                                      " only labels and labels.<key> are mutable")
        self._c.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (_labels_json(new), now_ns, rec.id),
        )
        return self.must_get(key)


CHECKPOINT_EVERY = 256
INLINE_CHECKPOINT_PAGES = 10_000  # sqlite's default is 1000


class MetaStore:
    """The sqlite database at ``path``; one connection, used from one thread (and a
    checkpointing thread with its own connection; see the module docstring)."""

    def __init__(self, path: str | Path, *, checkpoint_every: int = CHECKPOINT_EVERY,
                 readonly: bool = False) -> None:
        self.path = Path(path)
        self._checkpoint_every = max(1, checkpoint_every)
        self._writes = 0
        self._checkpointer: threading.Thread | None = None
        self.schema_version = SCHEMA_VERSION
        if readonly:  # for tools beside a running serve: no pragma that writes, no migration
            try:
                self._c = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                          isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StartupError(f"cannot open {self.path}: {exc}") from None
            return
        self._c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._c.execute("PRAGMA journal_mode = WAL")
        self._c.execute("PRAGMA synchronous = NORMAL")
        self._c.execute("PRAGMA foreign_keys = ON")
        self._c.execute("PRAGMA busy_timeout = 5000")
        self._c.execute(f"PRAGMA wal_autocheckpoint = {INLINE_CHECKPOINT_PAGES}")
        with self.write() as tx:
            migrate(tx._c)

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction: committed when the block ends, rolled back on error."""
        self._c.execute("BEGIN IMMEDIATE")
        try:
            yield Tx(self._c)
        except BaseException:
            self._c.execute("ROLLBACK")
            raise
        self._c.execute("COMMIT")
        self._writes += 1
        if self._writes >= self._checkpoint_every:
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        """Start a background checkpoint unless one is running (then the next write
        transaction tries again)."""
        if self._checkpointer is not None and self._checkpointer.is_alive():
            return
        self._writes = 0
        self._checkpointer = threading.Thread(target=self._checkpoint,
                                              name="metastore-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("metastore checkpoint failed (retried later): %s", exc)

    def wait_checkpoint(self) -> None:
        """Wait for a running background checkpoint to end (tests, ``close``)."""
        if self._checkpointer is not None:
            self._checkpointer.join()

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction with a consistent view."""
        self._c.execute("BEGIN")
        try:
            yield Tx(self._c)
        finally:
            self._c.execute("COMMIT")

    def reader(self) -> Tx:
        """Reads without an explicit transaction, sparing the ``BEGIN``/``COMMIT`` round
        trips of ``read()`` on hot paths: in autocommit mode every statement is atomic on
        its own. Several reads in a row see one state as long as nothing awaits between
        them, since this connection, on the event loop, is the only writer."""
        return Tx(self._c)

    def close(self) -> None:
        """Wait for a running checkpoint, then close (sqlite checkpoints the rest of the
        log as the last connection closes)."""
        self.wait_checkpoint()
        self._c.close()
