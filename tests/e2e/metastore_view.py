"""A read-only view of lazysnap's metastore and snapshot directories, for assertions.

The layout is lazysnap's contract with these tests: ``ROOT/metadata.db`` (sqlite), table
``snapshots(id INTEGER PRIMARY KEY, key TEXT UNIQUE, parent_id INTEGER NULL, kind TEXT,
labels TEXT (JSON object), created_ns, updated_ns, size, inodes INTEGER)`` and snapshot
directories ``ROOT/snapshots/<id>/fs`` (plus ``/work`` for active snapshots). The database
is opened with ``mode=ro`` so a test can never change what it inspects.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SnapshotRow:
    """One row of the ``snapshots`` table."""

    id: int
    key: str
    parent_id: int | None
    kind: str
    labels: dict[str, str]
    created_ns: int
    updated_ns: int
    size: int
    inodes: int


def db_path(root: Path) -> Path:
    """Where lazysnap keeps its metastore under ``root``."""
    return root / "metadata.db"


def read_snapshots(root: Path) -> dict[int, SnapshotRow]:
    """Every snapshot record, by id. Raises FileNotFoundError if there is no database and
    sqlite3.Error if it is unreadable or lacks the documented columns."""
    path = db_path(root)
    if not path.exists():
        raise FileNotFoundError(f"no lazysnap metastore at {path}")
    uri = f"file:{path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT id, key, parent_id, kind, labels, created_ns, updated_ns, size, inodes "
            "FROM snapshots ORDER BY id"
        ).fetchall()
    out: dict[int, SnapshotRow] = {}
    for rid, key, parent_id, kind, labels, created, updated, size, inodes in rows:
        decoded = json.loads(labels) if labels else {}
        if not isinstance(decoded, dict):
            raise ValueError(f"snapshot {key!r}: labels are not a JSON object: {labels!r}")
        out[rid] = SnapshotRow(rid, key, parent_id, kind, decoded, created, updated, size,
                               inodes)
    return out


def snapshot_dirs(root: Path) -> set[str]:
    """Names of the entries under ``ROOT/snapshots`` (empty if the directory is missing)."""
    base = root / "snapshots"
    return {p.name for p in base.iterdir()} if base.is_dir() else set()


def backend_key_matches(backend_key: str, client_name: str) -> bool:
    """True if ``backend_key`` is how containerd's metadata layer names ``client_name``.

    containerd namespaces backend keys as ``<namespace>/<seq>/<name>``; a remote snapshot
    lazysnap committed itself keeps its bare chain ID.
    """
    if backend_key == client_name:
        return True
    parts = backend_key.split("/", 2)
    return len(parts) == 3 and parts[1].isdigit() and parts[2] == client_name
