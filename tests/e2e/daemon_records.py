"""lazysnap's FUSE daemons as the end-to-end tests see them: their records in the
metastore (table ``daemons`` of ``ROOT/metadata.db``, opened read-only), their processes
(by command line) and their control socket's shutdown request.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path

FUSE_FSTYPE = "fuse.lazysnap"


@dataclass(frozen=True)
class DaemonRow:
    """One row of lazysnap's ``daemons`` table (``ROOT/metadata.db``)."""

    id: str
    mode: str
    pid: int
    control: str
    mountpoint: str
    state: str


def read_daemon_rows(root: Path) -> list[DaemonRow]:
    """Every daemon record under ``root``, opened read-only; empty if there is no
    metastore or no ``daemons`` table yet."""
    path = root / "metadata.db"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            timeout=10)) as conn:
        try:
            rows = conn.execute("SELECT id, mode, pid, control, mountpoint, state"
                                " FROM daemons ORDER BY id").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
    return [DaemonRow(str(i), str(m), int(p), str(c), str(mp), str(s))
            for i, m, p, c, mp, s in rows]


def is_daemon_process(pid: int, control: str) -> bool:
    """True while ``pid`` is a live lazysnap FUSE daemon whose command line names
    ``control`` (any daemon when ``control`` is empty)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if state[state.rindex(")") + 2] == "Z":
        return False
    argv = raw.decode("utf-8", "replace").split("\0")
    return "snapshotter.fs" in argv and (not control or control in argv)


def request_daemon_shutdown(control: str, *, timeout: float = 5.0) -> bool:
    """``POST /v1/shutdown`` on a daemon's control socket; True if it answered 2xx."""
    request = (b"POST /v1/shutdown HTTP/1.1\r\nHost: daemon\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(control)
            sock.sendall(request)
            status = sock.recv(64).split(b" ", 2)
    except OSError:
        return False
    return len(status) > 1 and status[1].startswith(b"2")
