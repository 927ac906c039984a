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
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from snapshotter.metastore.schema import SCHEMA_VERSION, migrate
from snapshotter.model import Info, Kind


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


def _labels_json(labels: Mapping[str, str]) -> str:
    """Serialise labels, dropping empty values: containerd never stores those."""
    return json.dumps({k: v for k, v in labels.items() if v}, sort_keys=True)


def _row(row: Sequence[object]) -> Record:
    labels = json.loads(str(row[5]))
    return Record(
        id=int(str(row[0])), key=str(row[1]),
        parent_id=None if row[2] is None else int(str(row[2])),
        parent=str(row[3]), kind=Kind(str(row[4])), labels=labels,
        created_ns=int(str(row[6])), updated_ns=int(str(row[7])),
        size=int(str(row[8])), inodes=int(str(row[9])),
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

    def get_by_id(self, sid: int) -> Record | None:
        row = self._c.execute(_SELECT + " WHERE s.id = ?", (sid,)).fetchone()
        return None if row is None else _row(row)

    def records(self) -> list[Record]:
        return [_row(r) for r in self._c.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self._c.execute("SELECT id FROM snapshots")}

    def parents(self, rec: Record) -> list[Record]:
        """The parent chain of ``rec``, nearest parent first, base layer last."""
        chain: list[Record] = []
        pid = rec.parent_id
        while pid is not None:
            parent = self.get_by_id(pid)
            if parent is None:
                raise Internal(f"snapshot {rec.key!r} has a dangling parent id {pid}")
            chain.append(parent)
            pid = parent.parent_id
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
        cur = self._c.execute(
            "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, kind.value, _labels_json(labels), now_ns, now_ns),
        )
        assert cur.lastrowid is not None
        return self.must_get(key)

    def commit(
        self, key: str, name: str, labels: Mapping[str, str], size: int, inodes: int, now_ns: int
    ) -> Record:
        """Turn active ``key`` into committed ``name``; labels are replaced, id kept."""
        rec = self.must_get(key)
        if rec.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is a {rec.kind.value} snapshot, not active")
        if self.get(name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        self._c.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (name, Kind.COMMITTED.value, _labels_json(labels), now_ns,
             now_ns, size, inodes, rec.id),
        )
        return self.must_get(name)

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

    def set_usage(self, key: str, size: int, inodes: int) -> None:
        self._c.execute("UPDATE snapshots SET size = ?, inodes = ? WHERE key = ?",
                        (size, inodes, key))


class MetaStore:
    """The sqlite database at ``path``; one connection, used from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._c.execute("PRAGMA journal_mode = WAL")
        self._c.execute("PRAGMA synchronous = NORMAL")
        self._c.execute("PRAGMA foreign_keys = ON")
        self._c.execute("PRAGMA busy_timeout = 5000")
        with self.write() as tx:
            migrate(tx._c)
        self.schema_version = SCHEMA_VERSION

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

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction with a consistent view."""
        self._c.execute("BEGIN")
        try:
            yield Tx(self._c)
        finally:
            self._c.execute("COMMIT")

    def close(self) -> None:
        self._c.close()
