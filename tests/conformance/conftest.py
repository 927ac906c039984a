"""Fixtures and helpers of the conformance suite.

* ``service``: starts ``python -m snapshotter serve`` on a fresh root and socket under
  ``/tmp``, waits until the socket accepts a gRPC connection, and on teardown unmounts
  everything under its directory, sends SIGTERM and checks the exit status is 0.
  ``module_service`` is the same, shared by the read-only tests of one module.
* ``snap``: a thin synchronous client (:class:`Snap`) over the generated stub.
* ``mounter``: performs the mounts a snapshotter returns, the way containerd's
  ``mount.All`` does (:class:`Mounter`), and unmounts them at teardown.
* ``work``: a scratch directory for mountpoints.

Plus a small port of containerd's ``fstest``: appliers that change a directory tree and
:func:`check_directory_equal`, which compares two trees (type, mode, owner, content,
symlink target; not times, sizes of directories or xattrs).

Deadlines here (service start/stop, RPC timeouts) only bound a hung test; no test asserts
on how long anything takes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SNAPSHOTTER_NAME = "lazysnap"
START_DEADLINE = 60.0
STOP_DEADLINE = 60.0
RPC_TIMEOUT = 120.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# containerd's suite labels every snapshot with a gc root so its GC leaves them alone.
GC_ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


def fail(message: str) -> NoReturn:
    """``pytest.fail`` with a return type mypy understands."""
    pytest.fail(message, pytrace=False)
    raise AssertionError(message)  # pragma: no cover - pytest.fail raises


# --- the service process --------------------------------------------------------------------


@dataclass
class Service:
    """One running snapshotter process and a channel to it."""

    base: Path
    root: Path
    socket: Path
    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    channel: grpc.Channel
    stub: Any

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the service's stdout+stderr, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def snapshot_dirs(self) -> set[str]:
        """Names of the entries in ``ROOT/snapshots`` (empty when it does not exist)."""
        try:
            return set(os.listdir(self.root / "snapshots"))
        except FileNotFoundError:
            return set()

    def stop(self, signals: int = 1) -> int:
        """Close the channel, send SIGTERM ``signals`` times, wait; return the exit status."""
        self.channel.close()
        for _ in range(signals):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            fail(f"service did not exit within {STOP_DEADLINE}s of SIGTERM\n{self.log_tail()}")


def start_service(base: Path, log_name: str = "service.log") -> Service:
    """Start the snapshotter with root ``base/root`` and socket ``base/snap.sock``.

    Returns once a gRPC connection to the socket is ready; fails the test (with the log)
    if the process exits first or the deadline passes.
    """
    root, socket, config = base / "root", base / "snap.sock", base / "config.toml"
    if not config.exists():
        config.write_text('[metrics]\naddress = ""\n')
    log_path = base / log_name
    cmd = [
        sys.executable, "-m", "snapshotter", "serve", "--address", str(socket),
        "--root", str(root), "--config", str(config), "--log-level", "debug",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"unix:{socket}")
    service = Service(base, root, socket, config, log_path, proc, channel, None)
    ready = grpc.channel_ready_future(channel)
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            ready.result(timeout=0.25)
            break
        except grpc.FutureTimeoutError:
            if proc.poll() is not None:
                channel.close()
                fail(f"service exited with {proc.returncode} before serving\n{service.log_tail()}")
            if time.monotonic() > deadline:
                channel.close()
                proc.kill()
                proc.wait()
                fail(f"service not ready within {START_DEADLINE}s\n{service.log_tail()}")
    service.stub = pb_grpc.SnapshotsStub(channel)
    return service


def _mountpoints_under(base: Path) -> list[str]:
    """Mountpoints at or below ``base``, deepest first (from /proc/self/mountinfo)."""
    prefix = str(base).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # mountinfo escapes space, tab, newline and backslash as \ooo
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_everything_under(base: Path) -> list[str]:
    """Unmount every mount below ``base`` (lazily if busy); return what was mounted."""
    points = _mountpoints_under(base)
    for point in points:
        done = subprocess.run(["umount", point], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return points


@contextlib.contextmanager
def running_service() -> Iterator[Service]:
    """A fresh snapshotter on a fresh root under /tmp. On exit: unmount everything below
    its directory, SIGTERM, check exit status 0 and that no mount was leaked."""
    base = Path(tempfile.mkdtemp(prefix="lazysnap-conf-", dir="/tmp"))
    try:
        svc = start_service(base)
        yield svc
        unmount_everything_under(base)
        code = svc.stop()
        leaked = unmount_everything_under(base)
        assert code == 0, f"service exited with {code} after SIGTERM\n{svc.log_tail()}"
        assert not leaked, f"mounts left behind after the service exited: {leaked}"
    finally:
        unmount_everything_under(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def service() -> Iterator[Service]:
    """A service of the test's own."""
    with running_service() as svc:
        yield svc


@pytest.fixture(scope="module")
def module_service() -> Iterator[Service]:
    """A service shared by a module's read-only tests (set up by a module fixture)."""
    with running_service() as svc:
        yield svc


# --- a thin client --------------------------------------------------------------------------


def rpc_error(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    """Run ``call``, check it fails with ``code`` and a non-empty message; return it."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = cast(grpc.Call, info.value)
    details = err.details() or ""
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {details}"
    assert details.strip(), f"{code.name} without a message"
    return details


class Snap:
    """Synchronous convenience calls over the Snapshots stub; errors are grpc.RpcError."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> Any:
        req = pb.PrepareSnapshotRequest(
            snapshotter=SNAPSHOTTER_NAME, key=key, parent=parent, labels=_labels(labels)
        )
        return list(self.stub.Prepare(req, timeout=RPC_TIMEOUT).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> Any:
        req = pb.ViewSnapshotRequest(
            snapshotter=SNAPSHOTTER_NAME, key=key, parent=parent, labels=_labels(labels)
        )
        return list(self.stub.View(req, timeout=RPC_TIMEOUT).mounts)

    def mounts(self, key: str) -> Any:
        req = pb.MountsRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        return list(self.stub.Mounts(req, timeout=RPC_TIMEOUT).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(
            snapshotter=SNAPSHOTTER_NAME, name=name, key=key, labels=_labels(labels)
        )
        self.stub.Commit(req, timeout=RPC_TIMEOUT)

    def remove(self, key: str) -> None:
        req = pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        self.stub.Remove(req, timeout=RPC_TIMEOUT)

    def stat(self, key: str) -> Any:
        req = pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        return self.stub.Stat(req, timeout=RPC_TIMEOUT).info

    def update(self, info: Any, *paths: str) -> Any:
        req = pb.UpdateSnapshotRequest(
            snapshotter=SNAPSHOTTER_NAME, info=info, update_mask=FieldMask(paths=list(paths))
        )
        return self.stub.Update(req, timeout=RPC_TIMEOUT).info

    def infos(self, *filters: str) -> list[Any]:
        req = pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER_NAME, filters=list(filters))
        return [info for resp in self.stub.List(req, timeout=RPC_TIMEOUT) for info in resp.info]

    def names(self, *filters: str) -> list[str]:
        """Sorted names List returns for ``filters``."""
        return sorted(info.name for info in self.infos(*filters))

    def usage(self, key: str) -> tuple[int, int]:
        req = pb.UsageRequest(snapshotter=SNAPSHOTTER_NAME, key=key)
        resp = self.stub.Usage(req, timeout=RPC_TIMEOUT)
        return int(resp.size), int(resp.inodes)

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=SNAPSHOTTER_NAME), timeout=RPC_TIMEOUT)


def _labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    return dict(GC_ROOT if labels is None else labels)


@pytest.fixture
def snap(service: Service) -> Snap:
    """A client of the ``service`` fixture."""
    return Snap(service.stub)


@pytest.fixture
def work(service: Service) -> Path:
    """A scratch directory (mountpoints, flat check trees) beside the service root."""
    path = service.base / "work"
    path.mkdir(exist_ok=True)
    return path


# --- mounting -------------------------------------------------------------------------------


@dataclass
class Mounter:
    """Mounts what a snapshotter returns, like containerd's ``mount.All``; remembers it."""

    mounted: list[Path] = field(default_factory=list)

    def mount_all(self, mounts: Sequence[Any], target: Path) -> None:
        """Mount each ``containerd.types.Mount`` on ``target`` (created if missing)."""
        target.mkdir(parents=True, exist_ok=True)
        assert mounts, "no mounts to mount"
        for m in mounts:
            self._mount_one(str(m.type), str(m.source), [str(o) for o in m.options], target)
            self.mounted.append(target)

    def _mount_one(self, kind: str, source: str, options: list[str], target: Path) -> None:
        if kind == "bind":
            flag = "--rbind" if "rbind" in options else "--bind"
            _run(["mount", flag, source, str(target)])
            if "ro" in options:
                _run(["mount", "-o", "remount,ro,bind", str(target)])
            return
        cwd, options = _compact_lowerdir(options)
        _run(["mount", "-t", kind, source, "-o", ",".join(options), str(target)], cwd=cwd)

    def unmount(self, target: Path) -> None:
        """Unmount everything this mounter mounted on ``target``."""
        while target in self.mounted:
            self.mounted.remove(target)
            _run(["umount", str(target)])

    def unmount_all(self) -> None:
        for target in reversed(list(dict.fromkeys(self.mounted))):
            with contextlib.suppress(AssertionError, pytest.fail.Exception):
                self.unmount(target)


def _compact_lowerdir(options: list[str]) -> tuple[str | None, list[str]]:
    """containerd's trick for long option strings: when they exceed a page, mount from
    the lower dirs' common directory with relative lower dirs (``mount_linux.go``)."""
    if len(",".join(options)) < PAGE_SIZE:
        return None, options
    lowers = [o for o in options if o.startswith("lowerdir=")]
    if len(lowers) != 1:
        return None, options
    dirs = lowers[0].removeprefix("lowerdir=").split(":")
    common = os.path.commonpath(dirs)
    relative = ":".join(os.path.relpath(d, common) for d in dirs)
    return common, [f"lowerdir={relative}" if o == lowers[0] else o for o in options]


def _run(cmd: list[str], cwd: str | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        fail(f"{' '.join(cmd)!r} failed ({done.returncode}): {done.stderr.strip()}")


@pytest.fixture
def mounter(service: Service) -> Iterator[Mounter]:
    """Mounts made during the test; unmounted before the service stops."""
    m = Mounter()
    yield m
    m.unmount_all()


# --- fstest: appliers and tree comparison ---------------------------------------------------

Applier = Callable[[Path], None]


def _at(root: Path, rel: str) -> Path:
    return root / rel.lstrip("/")


def create_file(rel: str, data: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = _at(root, rel)
        path.write_bytes(data)
        os.chmod(path, mode)

    return apply


def create_dir(rel: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = _at(root, rel)
        path.mkdir(exist_ok=True)
        os.chmod(path, mode)

    return apply


def remove_all(rel: str) -> Applier:
    def apply(root: Path) -> None:
        path = _at(root, rel)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    return apply


def chown(rel: str, uid: int, gid: int) -> Applier:
    def apply(root: Path) -> None:
        os.lchown(_at(root, rel), uid, gid)

    return apply


def rename(old: str, new: str) -> Applier:
    """Rename; on EXDEV (overlay without redirect_dir refuses to rename a lower
    directory) fall back to copy-and-delete, as ``mv`` and layer appliers do."""

    def apply(root: Path) -> None:
        src, dst = _at(root, old), _at(root, new)
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno != 18:  # EXDEV
                raise
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
            shutil.rmtree(src)

    return apply


def link(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.link(_at(root, old), _at(root, new))

    return apply


def symlink(target: str, rel: str) -> Applier:
    def apply(root: Path) -> None:
        os.symlink(target, _at(root, rel))

    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    entries: dict[str, tuple[object, ...]] = {}

    def walk(directory: Path, rel: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path, name = Path(entry.path), f"{rel}/{entry.name}"
            st = os.lstat(path)
            detail: object = None
            if stat.S_ISREG(st.st_mode):
                detail = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                detail = st.st_rdev
            entries[name] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                             st.st_gid, detail)  # fmt: skip
            if stat.S_ISDIR(st.st_mode):
                walk(path, name)

    walk(root, "")
    return entries


def check_directory_equal(expected: Path, actual: Path) -> None:
    """Fail unless the trees below ``expected`` and ``actual`` are the same (the roots
    themselves are not compared, as in containerd's ``fstest.CheckDirectoryEqual``)."""
    want, got = _tree(expected), _tree(actual)
    problems = [f"missing {p}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {p}" for p in sorted(got.keys() - want.keys())]
    problems += [
        f"differs {p}: want {want[p]!r:.120} got {got[p]!r:.120}"
        for p in sorted(want.keys() & got.keys())
        if want[p] != got[p]
    ]
    if problems:
        fail(f"{actual} != {expected}:\n  " + "\n  ".join(problems[:30]))


def snapshot_id(path: str, root: Path) -> str:
    """The ``<id>`` of a path ``ROOT/snapshots/<id>/fs`` (or ``/work``); fails otherwise."""
    rel = Path(path).relative_to(root / "snapshots")
    assert len(rel.parts) == 2 and rel.parts[1] in ("fs", "work"), path
    return rel.parts[0]
