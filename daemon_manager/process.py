"""Starting daemon processes and seeing them exit, without polling.

* ``spawn`` starts a process in its own session (so it survives ``lazysnap serve`` and
  is not hit by signals sent to the snapshotter's process group), with stdin from
  /dev/null, stdout and stderr appended to a log file, and an already-listening control
  socket as file descriptor 3 (socket activation: the manager can connect at once and
  its requests wait in the backlog until the daemon serves them, so readiness needs no
  sleeps).
* ``ProcessWatch`` turns a pid into an awaitable exit through a pidfd, which works for
  processes that are not our children (daemons re-attached after a restart) too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from snapshotter.errdefs import DaemonError

CONTROL_FD = 3


def listen_unix(path: str) -> socket.socket:
    """Bind and listen on unix socket ``path`` (replacing a stale file), mode 0600."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def spawn(argv: Sequence[str], log_path: str, control: socket.socket) -> int:
    """Start ``argv`` in a new session; return its pid. Raises DaemonError."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return os.posix_spawn(
            argv[0], list(argv), dict(os.environ),
            setsid=True,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                (os.POSIX_SPAWN_DUP2, control.fileno(), CONTROL_FD),
            ],
        )
    except OSError as e:
        raise DaemonError(f"cannot start {argv[0]}: {e.strerror}") from None
    finally:
        os.close(log_fd)


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_our_daemon(pid: int, control: str) -> bool:
    """True when ``pid`` is alive and is a lazysnap daemon serving ``control``."""
    if pid <= 0:
        return False
    args = cmdline(pid)
    return "snapshotter.fs" in args and control in args


def kill_session(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the daemon's whole session/process group; a missing process is fine."""
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class ProcessWatch:
    """An awaitable for the exit of one process, through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None

    async def exited(self) -> None:
        """Return when the process has exited (at once if it already had)."""
        if self._fd is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(self._fd, readable)
        try:
            await done
        finally:
            loop.remove_reader(self._fd)
        reap(self.pid)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
