"""Waiting, child processes, the process table and mounts, for the end-to-end harness.

Everything here acts only on things the harness started: processes are found by pid, by
session id or by a unique temporary path in their command line, and mounts by a path
prefix under one of the harness's own temporary directories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.05
TAIL_LINES = 80


class HarnessError(RuntimeError):
    """A harness step failed (start-up, shutdown, clean-up); the message says what and why."""


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``probe`` until it returns something other than None/False; return that value.

    ``alive`` is checked before every probe: if it returns a string (say, "process exited
    with code 1"), waiting stops at once with that reason. Raises HarnessError naming
    ``what`` on the deadline or on death. This is a deadline, not a timing assertion: the
    timeout only bounds how long a broken system takes to fail.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            reason = alive()
            if reason is not None:
                raise HarnessError(f"gave up waiting for {what}: {reason}")
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it).

    There is an unavoidable window before the caller binds it; callers that start a server
    on it must detect "address in use" and retry with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file, or a note saying why there are none."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:]) if text else f"<{path} is empty>"


class ManagedProcess:
    """One child process with stdout and stderr appended to a log file.

    The child runs in its own session (``start_new_session``) so that it and whatever it
    spawns without calling setsid can be found by session id and killed, even after the
    leader died. ``stop`` is idempotent.
    """

    def __init__(
        self, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The pid of the running (or last started) child; HarnessError if never started."""
        if self._proc is None:
            raise HarnessError(f"{self.argv[0]} was never started")
        return self._proc.pid

    def start(self) -> None:
        """Spawn the child; raises HarnessError if it is already running or cannot be run."""
        if self.exit_reason() is None:
            raise HarnessError(f"{self.argv[0]} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"==== harness: starting {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self._env, cwd=self._cwd, start_new_session=True,
                )
            except OSError as exc:
                raise HarnessError(f"cannot run {self.argv[0]}: {exc}") from exc

    def exit_reason(self) -> str | None:
        """None while the child runs; otherwise a short description of why it is not running."""
        if self._proc is None:
            return "never started"
        code = self._proc.poll()
        return None if code is None else f"{self.argv[0]} exited with code {code}"

    def stop(self, *, grace: float = 10.0, sweep: bool = True) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit code.

        With ``sweep``, every process left in the child's session is SIGKILLed afterwards.
        Returns None if the child was never started. Never raises for an already-dead child.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if sweep:
            kill_pids(session_members(self._proc.pid))
        return self._proc.returncode

    def kill9(self) -> None:
        """SIGKILL the child alone (its session members survive, as in a real crash)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@dataclass(frozen=True)
class ProcInfo:
    """One row of the process table."""

    pid: int
    ppid: int
    session: int
    argv: tuple[str, ...]


def process_table() -> list[ProcInfo]:
    """A snapshot of /proc; processes that vanish while it is read are skipped."""
    rows: list[ProcInfo] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        argv = tuple(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a)
        rows.append(ProcInfo(int(entry), int(fields[1]), int(fields[3]), argv))
    return rows


def session_members(session: int) -> list[int]:
    """Pids of live processes in ``session`` (zombies included, they are harmless to kill)."""
    return [p.pid for p in process_table() if p.session == session and p.pid != os.getpid()]


def descendants(pid: int, table: Iterable[ProcInfo] | None = None) -> list[int]:
    """Pids of every descendant of ``pid``, deepest first."""
    rows = list(process_table() if table is None else table)
    children: dict[int, list[int]] = {}
    for row in rows:
        children.setdefault(row.ppid, []).append(row.pid)
    order: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        current = stack.pop()
        order.append(current)
        stack.extend(children.get(current, []))
    return list(reversed(order))


def processes_mentioning(needle: str) -> list[ProcInfo]:
    """Processes whose command line contains ``needle`` (a unique harness path)."""
    me = os.getpid()
    return [p for p in process_table() if p.pid != me and any(needle in a for a in p.argv)]


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL each pid, ignoring ones that are already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pids: Iterable[int], *, timeout: float, what: str) -> None:
    """Wait until none of ``pids`` exists any more (zombies of other parents count as gone)."""
    wanted = set(pids)

    def gone() -> bool:
        for pid in wanted:
            try:
                state = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if state[state.rindex(")") + 2] != "Z":
                return False
        return True

    wait_until(gone, timeout=timeout, what=what)


def _unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (``\\040`` for space, ...) /proc/self/mountinfo uses."""
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountInfo:
    """One mount of this process's mount namespace."""

    mountpoint: str
    fstype: str
    source: str
    options: str


def mounts() -> list[MountInfo]:
    """Every mount in the current mount namespace, in mount order."""
    rows: list[MountInfo] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail_fields = left.split(), right.split()
        rows.append(
            MountInfo(
                mountpoint=_unescape_mountinfo(fields[4]),
                fstype=tail_fields[0],
                source=_unescape_mountinfo(tail_fields[1]),
                options=tail_fields[2] if len(tail_fields) > 2 else "",
            )
        )
    return rows


def mounts_under(root: Path) -> list[MountInfo]:
    """Mounts at or below ``root``, deepest (and most recent) first."""
    prefix = str(root).rstrip("/")
    found = [
        m for m in mounts() if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")
    ]
    found.reverse()
    return sorted(found, key=lambda m: m.mountpoint.count("/"), reverse=True)


def unmount_all_under(root: Path) -> list[str]:
    """Unmount everything at or below ``root``; return the mountpoints that were unmounted.

    Tries a plain ``umount`` first and falls back to a lazy one (a FUSE mount whose daemon
    died, or a busy overlay). Raises HarnessError if something is still mounted afterwards.
    """
    done: list[str] = []
    for _ in range(20):  # stacked mounts on one path need one round each
        found = mounts_under(root)
        if not found:
            return done
        for mount in found:
            result = subprocess.run(
                ["umount", mount.mountpoint], capture_output=True, check=False, timeout=60,
            )
            if result.returncode != 0:
                subprocess.run(
                    ["umount", "-l", mount.mountpoint], capture_output=True, check=False,
                    timeout=60,
                )
            done.append(mount.mountpoint)
    left = [m.mountpoint for m in mounts_under(root)]
    if left:
        raise HarnessError(f"could not unmount {left}")
    return done
