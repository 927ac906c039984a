"""The metastore schema and its migrations.

``SCHEMA_VERSION`` is stored in table ``meta``. ``migrate`` brings an older database up
to date step by step and refuses a newer one (written by a newer lazysnap).
"""

from __future__ import annotations

import sqlite3

from snapshotter.errdefs import StartupError

SCHEMA_VERSION = 2

_STEPS: dict[int, str] = {
    1: """
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        parent_id INTEGER REFERENCES snapshots(id),
        kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
        labels TEXT NOT NULL DEFAULT '{}',
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        inodes INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX snapshots_parent ON snapshots(parent_id);
    """,
    2: """
    CREATE TABLE daemons (
        id TEXT PRIMARY KEY,
        mode TEXT NOT NULL,
        pid INTEGER NOT NULL DEFAULT 0,
        control TEXT NOT NULL,
        mountpoint TEXT NOT NULL,
        state TEXT NOT NULL,
        spec TEXT NOT NULL DEFAULT '{}',
        updated_ns INTEGER NOT NULL
    );
    """,
}


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema inside the caller's transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    current = int(row[0]) if row else 0
    if current > SCHEMA_VERSION:
        raise StartupError(
            f"metadata.db has schema version {current}; this lazysnap knows {SCHEMA_VERSION}"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in _STEPS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (str(SCHEMA_VERSION),),
    )
