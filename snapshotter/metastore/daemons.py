"""Persisted daemon records and the daemon lifecycle states.

A record is written (state STARTING) before a daemon is spawned and deleted before it is
torn down, so after a crash of ``lazysnap serve`` every daemon that may exist is known.
Records live in the metastore's ``daemons`` table; ``spec`` is the JSON the daemon needs
to be started again (mount point, layers).

State machine::

    STARTING --ready--> RUNNING --exit--> DIED --restart--> STARTING
        |                  |                 `--limit reached--> FAILED
        `--error--> DIED   `--stop--> STOPPED (record deleted)
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from snapshotter.metastore.store import MetaStore


class DaemonState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DIED = "died"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class DaemonRecord:
    """One daemon process: ``id`` is ``layer-<snapshot id>`` or ``shared``."""

    id: str
    mode: str
    control: str
    mountpoint: str
    state: DaemonState = DaemonState.STARTING
    pid: int = 0
    spec: dict[str, Any] = field(default_factory=dict)
    updated_ns: int = 0

    def with_(self, **changes: Any) -> DaemonRecord:
        return replace(self, **changes)


class DaemonTable:
    """CRUD over the ``daemons`` table, each call its own transaction."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store

    def put(self, rec: DaemonRecord) -> None:
        with self.store.write() as tx:
            tx.conn.execute(
                "INSERT INTO daemons (id, mode, pid, control, mountpoint, state, spec, updated_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " mode=excluded.mode, pid=excluded.pid, control=excluded.control,"
                " mountpoint=excluded.mountpoint, state=excluded.state, spec=excluded.spec,"
                " updated_ns=excluded.updated_ns",
                (rec.id, rec.mode, rec.pid, rec.control, rec.mountpoint, rec.state.value,
                 json.dumps(rec.spec, sort_keys=True), rec.updated_ns),
            )

    def delete(self, daemon_id: str) -> None:
        with self.store.write() as tx:
            tx.conn.execute("DELETE FROM daemons WHERE id = ?", (daemon_id,))

    def get(self, daemon_id: str) -> DaemonRecord | None:
        with self.store.read() as tx:
            row = tx.conn.execute(
                "SELECT id, mode, pid, control, mountpoint, state, spec, updated_ns"
                " FROM daemons WHERE id = ?", (daemon_id,)).fetchone()
        return None if row is None else _record(row)

    def all(self) -> list[DaemonRecord]:
        """Every record, by id (none in a read-only store of schema version 1, which had
        no daemons table)."""
        with self.store.read() as tx:
            if tx.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                               " AND name = 'daemons'").fetchone() is None:
                return []
            rows = tx.conn.execute(
                "SELECT id, mode, pid, control, mountpoint, state, spec, updated_ns"
                " FROM daemons ORDER BY id").fetchall()
        return [_record(r) for r in rows]

    def __iter__(self) -> Iterator[DaemonRecord]:
        return iter(self.all())


def _record(row: tuple[Any, ...]) -> DaemonRecord:
    return DaemonRecord(
        id=str(row[0]), mode=str(row[1]), pid=int(row[2]), control=str(row[3]),
        mountpoint=str(row[4]), state=DaemonState(str(row[5])), spec=json.loads(str(row[6])),
        updated_ns=int(row[7]),
    )
