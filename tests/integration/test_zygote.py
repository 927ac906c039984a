"""The zygote forks daemons that look exactly like spawned ones (real processes)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_manager import process
from daemon_manager.zygote import ZygoteClient
from snapshotter.errdefs import DaemonError


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[tuple[ZygoteClient, int]]:
    sock = process.listen_unix(str(tmp_path / "zygote.sock"))
    pid = process.spawn([sys.executable, "-m", "daemon_manager.zygote"],
                        str(tmp_path / "zygote.log"), sock)
    sock.close()
    try:
        yield ZygoteClient(str(tmp_path / "zygote.sock"), timeout=60), pid
    finally:
        process.kill_session(pid)
        process.reap(pid)


def daemon_argv(tmp_path: Path, config: str = "missing.json") -> list[str]:
    return [sys.executable, "-m", "snapshotter.fs", "--mode", "dedicated",
            "--mountpoint", str(tmp_path / "mnt"), "--control", str(tmp_path / "c.sock"),
            "--control-fd", "3", "--config", str(tmp_path / config)]


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if state[state.rindex(")") + 2] == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running")


def test_forked_daemon_has_the_daemon_command_line_session_and_log(
        tmp_path: Path, zygote: tuple[ZygoteClient, int]) -> None:
    client, zygote_pid = zygote
    # Each daemon blocks reading its configuration from a FIFO until the test has looked
    # at it, then gets an invalid one and exits (an exited process has no cmdline).
    fifos = [tmp_path / f"config-{i}" for i in range(2)]
    for fifo in fifos:
        os.mkfifo(fifo)
    control = process.listen_unix(str(tmp_path / "c.sock"))
    try:
        argvs = [daemon_argv(tmp_path, fifo.name) for fifo in fifos]
        pids = [client.spawn(argv, str(tmp_path / "daemon.log"), control) for argv in argvs]
    finally:
        control.close()
    for pid, argv, fifo in zip(pids, argvs, fifos, strict=True):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert cmdline.split(b"\0")[:-1] == [a.encode() for a in argv]
        assert process.is_our_daemon(pid, str(tmp_path / "c.sock"))
        assert os.getsid(pid) == pid  # a session of its own
        assert os.getpgid(pid) == pid
        with open(fifo, "w") as f:  # unblocks the daemon: an empty object is refused
            f.write("{}")
        wait_gone(pid)
    log = (tmp_path / "daemon.log").read_text()
    assert log.count("ERROR snapshotter.fs[") == 2, log  # each ran the daemon's main
    assert Path(f"/proc/{zygote_pid}").exists()  # the zygote lives on


def test_requests_that_are_not_daemons_are_refused(
        tmp_path: Path, zygote: tuple[ZygoteClient, int]) -> None:
    client, _ = zygote
    control = process.listen_unix(str(tmp_path / "c.sock"))
    try:
        with pytest.raises(DaemonError, match="bad request"):
            client.spawn(["/bin/sh", "-c", "true", "x"], str(tmp_path / "x.log"), control)
    finally:
        control.close()


def test_a_dead_zygote_is_a_daemon_error(tmp_path: Path) -> None:
    with process.listen_unix(str(tmp_path / "c.sock")) as control, \
            pytest.raises(DaemonError, match="zygote"):
        ZygoteClient(str(tmp_path / "none.sock"), timeout=1).spawn(
            daemon_argv(tmp_path), str(tmp_path / "x.log"), control)
