"""The processes an end-to-end test runs: a registry, containerd and lazysnap.

Each class owns one child process, its temporary directory layout and its log file.
``start`` returns only when the service answers (or raises HarnessError with the last lines
of its log); ``stop`` is idempotent and leaves no process of its own behind. Nothing here
touches the system's containerd: every instance has its own root, state, sockets and
namespace, and servers bind 127.0.0.1 on ports the kernel picked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest

from .daemon_records import (
    FUSE_FSTYPE,
    DaemonRow,
    is_daemon_process,
    read_daemon_rows,
    request_daemon_shutdown,
)
from .procs import (
    HarnessError,
    ManagedProcess,
    descendants,
    free_port,
    kill_pids,
    mounts_under,
    processes_mentioning,
    tail,
    unmount_all_under,
    wait_gone,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_BINARIES = (
    "containerd", "ctr", "runc", "containerd-shim-runc-v2", "docker-registry", "ctr-remote",
    "mount", "umount",
)
# containerd-shim-runc-v2 puts its socket here whatever containerd's state dir is
# (containerd 1.6 runtime/v2/shim/util_unix.go); the harness only removes its own.
SHIM_SOCKET_DIR = Path("/run/containerd/s")
# The shim's clean-up of a dead shim (and ctr-remote image optimize) run runc with its
# default root, which creates an (empty) directory per namespace here.
DEFAULT_RUNC_ROOT = Path("/run/containerd/runc")
# Never through an HTTP proxy from the environment: every server is on 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_tools(*extra: str) -> None:
    """Fail (never skip) the calling test, naming every missing end-to-end prerequisite
    (plus the ``extra`` binaries a particular test needs)."""
    missing = [name for name in (*REQUIRED_BINARIES, *extra) if shutil.which(name) is None]
    if os.geteuid() != 0:
        missing.append("root (euid 0)")
    try:
        if not stat.S_ISCHR(os.stat("/dev/fuse").st_mode):
            missing.append("/dev/fuse (not a character device)")
    except OSError:
        missing.append("/dev/fuse")
    if not _overlay_supported():
        missing.append("overlay filesystem support (/proc/filesystems, modprobe overlay)")
    if not _is_static_elf(Path("/bin/busybox")):
        missing.append("a statically linked /bin/busybox (busybox-static)")
    if missing:
        pytest.fail("end-to-end prerequisites missing: " + ", ".join(missing), pytrace=False)


def _overlay_supported() -> bool:
    def listed() -> bool:
        try:
            return "overlay" in Path("/proc/filesystems").read_text().split()
        except OSError:
            return False

    if not listed() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "overlay"], capture_output=True, check=False, timeout=60)
    return listed()


def _is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP program header."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:6] != b"\x7fELF\x02\x01":
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = (struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum))
    return 3 not in types  # PT_INTERP


def _startup_failure(what: str, exc: HarnessError, log_path: Path) -> HarnessError:
    return HarnessError(f"{what} did not start: {exc}\n--- last lines of {log_path} ---\n"
                        f"{tail(log_path)}")


class CommandError(HarnessError):
    """A command the harness ran exited non-zero; carries its output."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"command failed (exit {result.returncode}): {' '.join(map(str, result.args))}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )


class Registry:
    """A Distribution 2.8 registry on 127.0.0.1 with filesystem storage in ``workdir``.

    Unless ``port`` is given, ``start`` picks a free port the first time; the port and the
    storage are kept for every later ``start``, so a test can stop the registry mid-read
    and bring the same one back.
    """

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self.port: int | None = port
        self._proc: ManagedProcess | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``; HarnessError before the first start."""
        if self.port is None:
            raise HarnessError("registry has no port yet (never started)")
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    def _write_config(self, port: int) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )

    def _answers(self) -> bool:
        try:
            with _OPENER.open(f"{self.url}/v2/", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _try_start(self, port: int, timeout: float) -> None:
        self.port = port
        self._write_config(port)
        self._proc = ManagedProcess(
            ["docker-registry", "serve", str(self.config_path)], self.log_path
        )
        self._proc.start()
        try:
            wait_until(self._answers, timeout=timeout, what=f"registry on {self.host}",
                       alive=self._proc.exit_reason)
        except HarnessError as exc:
            self._proc.stop()
            raise _startup_failure("docker-registry", exc, self.log_path) from exc

    def start(self, *, timeout: float = 30.0) -> None:
        """Start (or restart) the registry and wait until ``GET /v2/`` answers 200.

        On the first start a port that turns out to be taken is replaced by another, up to
        five times. Raises HarnessError, with the log tail, if the registry does not answer.
        """
        if self._proc is not None and self._proc.exit_reason() is None:
            raise HarnessError(f"registry on {self.host} is already running")
        if self.port is not None:
            self._try_start(self.port, timeout)
            return
        last: HarnessError | None = None
        for _ in range(5):
            try:
                self._try_start(free_port(), timeout)
                return
            except HarnessError as exc:
                if "address already in use" not in str(exc):
                    raise
                last, self.port = exc, None
        raise HarnessError(f"no free port for the registry after 5 tries: {last}")

    def stop(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL); idempotent. Storage and port are kept."""
        if self._proc is not None:
            self._proc.stop(grace=10)


class Containerd:
    """A private containerd 1.6 with its own root, state, sockets and namespace.

    The config registers a proxy snapshotter ``proxy_name`` at ``proxy_socket`` (containerd
    dials it lazily, so it may start before or after the snapshotter) and disables the CRI
    plugin and the ``opt`` plugin (which would otherwise write /opt/containerd).
    """

    def __init__(
        self, workdir: Path, *, proxy_socket: Path, proxy_name: str = "lazysnap",
        debug_level: str = "debug", extra_config: str = "",
    ) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.socket = workdir / "containerd.sock"
        self.runc_root = workdir / "runc"
        self.fifo_dir = workdir / "fifo"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self.proxy_socket = proxy_socket
        self.proxy_name = proxy_name
        # Unique per instance: ctr run puts containers in cgroup /<namespace>/<id>.
        self.namespace = f"lze2e-{uuid.uuid4().hex[:10]}"
        self._debug_level = debug_level
        self._extra_config = extra_config
        self._proc: ManagedProcess | None = None

    def _write_config(self) -> None:
        for path in (self.root, self.state, self.runc_root, self.fifo_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            f'[debug]\n  level = "{self._debug_level}"\n'
            f"[proxy_plugins.{self.proxy_name}]\n"
            f'  type = "snapshot"\n  address = "{self.proxy_socket}"\n'
            + self._extra_config
        )

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "version"],
            capture_output=True, text=True, check=False, timeout=30,
        )
        return result.returncode == 0

    def start(self, *, timeout: float = 60.0) -> None:
        """Write the config, start containerd and wait until ``ctr version`` answers.

        Raises HarnessError with the log tail if containerd exits or does not answer in time.
        """
        if self._proc is not None and self._proc.exit_reason() is None:
            raise HarnessError("containerd is already running")
        self._write_config()
        self._proc = ManagedProcess(
            ["containerd", "--config", str(self.config_path)], self.log_path
        )
        self._proc.start()
        try:
            wait_until(self._answers, timeout=timeout, what=f"containerd on {self.socket}",
                       alive=self._proc.exit_reason)
        except HarnessError as exc:
            self.stop()
            raise _startup_failure("containerd", exc, self.log_path) from exc

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 180.0,
        namespace: str | None = None, binary: str = "ctr",
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address S --namespace NS ARGS`` and return its result.

        ``binary="ctr-remote"`` runs stargz's ctr instead (same global flags). With
        ``check`` a non-zero exit raises CommandError (which carries stdout/stderr). A
        command that outlives ``timeout`` raises subprocess.TimeoutExpired.
        """
        argv = [binary, "--address", str(self.socket), "--namespace",
                namespace or self.namespace, *args]
        result = subprocess.run(argv, capture_output=True, text=True, check=False,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise CommandError(result)
        return result

    def run_container(
        self, ref: str, container_id: str, *command: str, snapshotter: str,
        extra: tuple[str, ...] = (), detach: bool = False, check: bool = True,
        timeout: float = 180.0,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run --net-host`` with ``--rm`` (or ``-d`` with ``detach``), runc state and IO
        fifos kept in this workdir (not in /run/containerd). CommandError with ``check``."""
        return self.ctr(
            "run", "-d" if detach else "--rm", "--net-host", "--snapshotter", snapshotter,
            "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir),
            *extra, ref, container_id, *command, check=check, timeout=timeout,
        )

    def pull(self, ref: str, *, snapshotter: str, timeout: float = 300.0) -> None:
        """``ctr image pull --plain-http --snapshotter S REF``; CommandError on failure."""
        self.ctr("image", "pull", "--plain-http", "--snapshotter", snapshotter, ref,
                 timeout=timeout)

    def rpull(
        self, ref: str, *, snapshotter: str, extra: tuple[str, ...] = (),
        timeout: float = 300.0,
    ) -> None:
        """``ctr-remote image rpull --plain-http --snapshotter S [EXTRA] REF``: a pull through
        containerd's unpacker, so Prepare carries ``containerd.io/snapshot.ref`` and the
        stargz labels and a snapshotter may answer ALREADY_EXISTS (``ctr image pull`` in
        1.6 never does that). CommandError on failure."""
        self.ctr("image", "rpull", "--plain-http", "--snapshotter", snapshotter, *extra, ref,
                 timeout=timeout, binary="ctr-remote")

    def running(self) -> bool:
        """True while the containerd process is alive."""
        return self._proc is not None and self._proc.exit_reason() is None

    def kill9(self) -> None:
        """SIGKILL containerd alone (its shims and containers keep running, as after a crash);
        ``stop`` still cleans them up."""
        if self._proc is not None:
            self._proc.kill9()

    def _remove_tasks_and_containers(self) -> None:
        """Best effort: SIGKILL and delete every task, then delete every container."""
        listing = self.ctr("namespaces", "ls", "-q", check=False, timeout=30)
        for ns in listing.stdout.split():
            tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=30, namespace=ns)
            for task in tasks.stdout.split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False,
                         timeout=30, namespace=ns)
                self.ctr("tasks", "delete", "-f", task, check=False, timeout=60,
                         namespace=ns)
            containers = self.ctr("containers", "ls", "-q", check=False, timeout=30,
                                  namespace=ns)
            for cid in containers.stdout.split():
                self.ctr("containers", "rm", cid, check=False, timeout=60, namespace=ns)

    def leftover_shims(self) -> list[int]:
        """Pids of containerd-shim processes started for this containerd."""
        return [p.pid for p in processes_mentioning(str(self.socket))
                if p.argv and "containerd-shim" in p.argv[0]]

    def _kill_shims(self) -> None:
        for proc in processes_mentioning(str(self.socket)):
            if not proc.argv or "containerd-shim" not in proc.argv[0]:
                continue
            victims = [*descendants(proc.pid), proc.pid]
            kill_pids(victims)
            wait_gone(victims, timeout=30, what=f"shim {proc.pid} and its containers")
            self._remove_shim_socket(proc.argv)

    def _remove_shim_socket(self, argv: tuple[str, ...]) -> None:
        """Delete the socket a SIGKILLed shim of ours left in /run/containerd/s (and only it)."""
        opts = dict(zip(argv[1::2], argv[2::2], strict=False))
        ns, cid = opts.get("-namespace"), opts.get("-id")
        if ns is None or cid is None:
            return
        digest = hashlib.sha256(os.path.join(str(self.socket), ns, cid).encode()).hexdigest()
        with contextlib.suppress(FileNotFoundError):
            (SHIM_SOCKET_DIR / digest).unlink()

    def _remove_cgroups(self) -> None:
        """rmdir this namespace's cgroups bottom-up (runc leaves a SIGKILLed container's)."""
        cgroup_root = Path("/sys/fs/cgroup")
        for parent in [cgroup_root, *cgroup_root.iterdir()]:
            top = parent / self.namespace
            if not top.is_dir():
                continue
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def stop(self) -> None:
        """Stop containerd and everything it started; idempotent.

        Kills and deletes remaining tasks while containerd still answers, stops containerd
        (SIGTERM, then SIGKILL), SIGKILLs any shim of its own that survived together with the
        shim's container processes, unmounts whatever is left under its root and state and
        removes its namespace's empty cgroups and empty default runc state directory.
        Raises HarnessError if a mount cannot go.
        """
        if self._proc is None:
            return
        if self._proc.exit_reason() is None:
            with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
                self._remove_tasks_and_containers()
        # Shims share containerd's session; kill them with their containers before sweeping
        # the session, or the containers would be orphaned.
        self._proc.stop(grace=15, sweep=False)
        self._kill_shims()
        self._proc.stop(sweep=True)
        unmount_all_under(self.state)
        unmount_all_under(self.root)
        self._remove_cgroups()
        with contextlib.suppress(OSError):  # only if empty: never another runc's state
            os.rmdir(DEFAULT_RUNC_ROOT / self.namespace)


class Lazysnap:
    """``python -m snapshotter serve`` from this checkout, as a managed process.

    The caller owns ``config_text`` (TOML; empty is allowed). ``start`` waits until the gRPC
    socket accepts a connection; ``stop`` is SIGTERM then SIGKILL; ``kill9`` simulates a
    crash (FUSE daemons it spawned in their own session survive, as they would in real life);
    ``cleanup`` removes whatever a crash or a bug left: processes naming ``root`` and mounts
    under ``root``. FUSE daemons outlive ``lazysnap serve`` on purpose (running containers
    keep their layers); ``stop_daemons`` stops the ones lazysnap has records of.
    """

    def __init__(
        self, workdir: Path, *, socket: Path | None = None, root: Path | None = None,
        config_text: str = "", log_level: str = "debug",
    ) -> None:
        self.workdir = workdir
        self.socket = socket or workdir / "lazysnap.sock"
        self.root = root or workdir / "root"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "lazysnap.log"
        self.config_text = config_text
        self.log_level = log_level
        self._proc: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        """Pid of the serving process; HarnessError if never started."""
        if self._proc is None:
            raise HarnessError("lazysnap was never started")
        return self._proc.pid

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        channel = grpc.insecure_channel(f"unix:{self.socket}")
        try:
            grpc.channel_ready_future(channel).result(timeout=1.0)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()

    def start(self, *, timeout: float = 60.0) -> None:
        """(Re)write the config, start serving and wait for the gRPC socket.

        Raises HarnessError with the log tail if the process exits or the socket does not
        accept a connection within ``timeout`` seconds.
        """
        if self._proc is not None and self._proc.exit_reason() is None:
            raise HarnessError("lazysnap is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        text = self.config_text
        if "[metrics]" not in text:
            # Tests run many services one after another (and benches beside them): none
            # binds the default metrics port unless a test asks for metrics.
            text += '\n[metrics]\naddress = ""\n'
        self.config_path.write_text(text)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self._proc = ManagedProcess(
            [sys.executable, "-m", "snapshotter", "serve", "--address", str(self.socket),
             "--root", str(self.root), "--config", str(self.config_path),
             "--log-level", self.log_level],
            self.log_path, env=env, cwd=REPO_ROOT,
        )
        self._proc.start()
        try:
            wait_until(self._answers, timeout=timeout, what=f"lazysnap gRPC on {self.socket}",
                       alive=self._proc.exit_reason)
        except HarnessError as exc:
            self._proc.stop(grace=5)
            raise _startup_failure("lazysnap", exc, self.log_path) from exc

    def running(self) -> bool:
        """True while the serving process is alive."""
        return self._proc is not None and self._proc.exit_reason() is None

    def stop(self, *, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; return the exit code (None if never
        started). Processes left in its session are SIGKILLed; mounts are left for the
        caller to inspect (see ``cleanup``)."""
        return self._proc.stop(grace=grace) if self._proc is not None else None

    def kill9(self) -> None:
        """SIGKILL the serving process only, as a crash would."""
        if self._proc is not None:
            self._proc.kill9()

    def cleanup(self) -> list[str]:
        """Kill leftover processes whose command line names ``root`` and unmount everything
        under ``root``; return a description of each thing removed (empty if clean)."""
        removed: list[str] = []
        leftovers = processes_mentioning(str(self.root))
        if leftovers:
            removed.extend(f"process {p.pid}: {' '.join(p.argv)}" for p in leftovers)
            kill_pids(p.pid for p in leftovers)
            wait_gone([p.pid for p in leftovers], timeout=30, what="lazysnap leftovers")
        removed.extend(f"mount {m}" for m in unmount_all_under(self.root))
        return removed

    def daemons(self) -> list[DaemonRow]:
        """The daemon records in lazysnap's metastore (empty when there is none yet)."""
        return read_daemon_rows(self.root)

    def stop_daemons(self, *, grace: float = 15.0) -> list[str]:
        """Stop the FUSE daemons lazysnap has records of, as an operator would after
        stopping lazysnap: ``POST /v1/shutdown`` on each control socket (a daemon then
        unmounts and exits), SIGKILL for any still alive after ``grace`` seconds, then
        unmount what is left of lazysnap's FUSE mounts under ``root`` (a killed daemon's
        mount, a shared daemon's bind mounts). Returns one line per daemon stopped.

        A daemon without a record, or any other mount, is not touched: ``cleanup``
        reports it as a leftover.
        """
        rows = [r for r in self.daemons() if is_daemon_process(r.pid, r.control)]
        for row in rows:
            request_daemon_shutdown(row.control)
        pids = [r.pid for r in rows]
        with contextlib.suppress(HarnessError):
            wait_gone(pids, timeout=grace, what="FUSE daemons to shut down")
        kill_pids(p for p in pids if is_daemon_process(p, ""))
        wait_gone(pids, timeout=30, what="SIGKILLed FUSE daemons")
        for mount in mounts_under(self.root):
            if mount.fstype.startswith(FUSE_FSTYPE):
                subprocess.run(["umount", "-l", mount.mountpoint], capture_output=True,
                               check=False, timeout=60)
        return [f"daemon {r.id} (pid {r.pid})" for r in rows]

