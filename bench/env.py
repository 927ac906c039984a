"""The benchmark's running system: registry (on the WAN link), lazysnap instances and one
containerd that knows every snapshotter under test.

``Variant`` is one column of the comparison: containerd's built-in ``overlayfs`` (eager:
``ctr image pull`` of the gzip image), ``lazysnap`` (dedicated daemons),
``lazysnap-shared`` (one shared daemon), each pulling the eStargz image with
``ctr-remote image rpull``, ``lazysnap-nydus`` (dedicated daemons, rpull of the nydus
image; cold-start figure only), ``lazysnap-opt`` (dedicated daemons, rpull of the
landmark-optimised eStargz image made for the workload being run; cold-start figure only)
and any extra proxy snapshotter given as ``NAME=SOCKET``.

``BenchEnv.cold`` makes a variant cold: the images removed with a synchronous garbage
collection (content and snapshots go with them), a lazysnap instance restarted on an empty
root (its chunk cache gone) and the page cache dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import REPO_ROOT, CommandError, Containerd, Lazysnap, Registry
from tests.e2e.procs import (
    HarnessError,
    processes_mentioning,
    unmount_all_under,
    wait_until,
)

from .images import CachedImage, optimized_tag
from .wan import LinkSpec, NetnsRegistry, WanLink, loopback_registry

LOG_DIR = REPO_ROOT / "bench" / "results"
_ACCESS = re.compile(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


@dataclass(frozen=True)
class Variant:
    """A snapshotter under test."""

    name: str
    lazy: bool  # rpull of a lazy image (else gzip through ctr image pull)
    mode: str = ""  # lazysnap daemon mode; "" for a snapshotter that is not ours
    socket: str = ""  # extra proxy snapshotters only
    image_tag: str = ""  # the tag it pulls; "" for the default (esgz if lazy, else gzip)
    cold_only: bool = False  # measured in the cold-start figure only
    optimized: bool = False  # pulls the image optimised for the workload (cold start only)

    @property
    def ours(self) -> bool:
        """True for a lazysnap instance the bench runs (and can restart)."""
        return bool(self.mode)

    @property
    def tag(self) -> str:
        """The image tag this variant pulls outside the cold-start figure."""
        return self.image_tag or ("esgz" if self.lazy else "gzip")

    @property
    def label(self) -> str:
        """The name shown in the report: ``name``, marked when the image is optimised."""
        return f"{self.name} (optimised image)" if self.optimized else self.name

    def tag_for(self, workload: str) -> str:
        """The image tag this variant pulls to run ``workload``: ``opt-<workload>`` when
        it is ``optimized``, else :attr:`tag`."""
        return optimized_tag(workload) if self.optimized else self.tag


OVERLAYFS = Variant("overlayfs", lazy=False)
LAZYSNAP = Variant("lazysnap", lazy=True, mode="dedicated")
LAZYSNAP_SHARED = Variant("lazysnap-shared", lazy=True, mode="shared")
LAZYSNAP_NYDUS = Variant("lazysnap-nydus", lazy=True, mode="dedicated", image_tag="nydus",
                         cold_only=True)
LAZYSNAP_OPT = Variant("lazysnap-opt", lazy=True, mode="dedicated", cold_only=True,
                       optimized=True)


def parse_extra(spec: str) -> Variant:
    """``NAME=SOCKET`` -> a lazy Variant for an extra proxy snapshotter."""
    name, sep, sock = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not sock.startswith("/"):
        raise ValueError(f"--snapshotter wants NAME=/path/to/socket, got {spec!r}")
    return Variant(name, lazy=True, socket=sock)


def registry_bytes(log_text: str) -> int:
    """Response bytes of every GET/HEAD under ``/v2/`` in a registry access log."""
    total = 0
    for m in _ACCESS.finditer(log_text):
        if m.group(2).startswith("/v2/") and m.group(4) != "-":
            total += int(m.group(4))
    return total


class AccessLog:
    """Counts bytes the registry sent, from its access log, between marks."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        """The log's current end."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def bytes_since(self, mark: int) -> int:
        """Bytes of the requests logged after ``mark``."""
        with open(self.path, "rb") as f:
            f.seek(mark)
            return registry_bytes(f.read().decode("utf-8", "replace"))


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class BenchEnv:
    """Registry, lazysnap instances and containerd; use as a context manager."""

    variants: Sequence[Variant]
    link: LinkSpec | None  # None: no shaping
    storage: Path
    lazysnap_overrides: str = ""  # TOML appended to every lazysnap config
    log: Callable[[str], None] = print
    always_keep_logs: bool = False  # keep the logs even when the run succeeds
    workdir: Path = field(default_factory=lambda: Path(
        tempfile.mkdtemp(prefix="lazysnap-bench-", dir="/tmp")))

    def __post_init__(self) -> None:
        self.wan: WanLink | None = WanLink(self.link) if self.link else None
        self.registry: NetnsRegistry | Registry
        if self.wan is not None:
            self.registry = NetnsRegistry(self.workdir / "registry", self.storage, self.wan)
        else:
            self.registry = loopback_registry(self.workdir / "registry", self.storage)
        self.lazysnaps: dict[str, Lazysnap] = {
            v.name: Lazysnap(self.workdir / v.name, socket=self.workdir / f"{v.name}.sock",
                             root=self.workdir / v.name / "root",
                             config_text=self._config(v), log_level="info")
            for v in self.variants if v.ours}
        self.containerd = Containerd(
            self.workdir / "containerd", proxy_socket=self.workdir / "lazysnap.sock",
            debug_level="info", extra_config=self._proxy_plugins())
        self.access = AccessLog(self.registry.log_path)
        self.retries: list[str] = []

    def _config(self, v: Variant) -> str:
        return (f'[daemon]\nmode = "{v.mode}"\n[metrics]\naddress = ""\n'
                + self.lazysnap_overrides)

    def _proxy_plugins(self) -> str:
        out = ""
        for v in self.variants:
            if v.name == "lazysnap" or not (v.ours or v.socket):
                continue
            sock = v.socket or str(self.workdir / f"{v.name}.sock")
            out += f'[proxy_plugins."{v.name}"]\n  type = "snapshot"\n  address = "{sock}"\n'
        return out

    def __enter__(self) -> BenchEnv:
        try:
            if self.wan is not None:
                self.wan.open()
            self.registry.start()
            for lz in self.lazysnaps.values():
                lz.start()
            self.containerd.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is not None or self.always_keep_logs:
                self.keep_logs()
        finally:
            self.close()

    def keep_logs(self) -> Path:
        """Copy every log of the run to ``bench/results/logs-<time>``; return that path."""
        dest = LOG_DIR / f"logs-{time.strftime('%Y%m%d-%H%M%S')}"
        for dirpath, dirnames, filenames in os.walk(self.workdir, onerror=lambda _: None):
            # Never into mounts: snapshot file systems (FUSE, overlay) hold image trees.
            dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
            for name in filenames:
                if not name.endswith(".log"):
                    continue
                log = Path(dirpath) / name
                target = dest / log.relative_to(self.workdir)
                with contextlib.suppress(OSError):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(log, target)
        self.log(f"logs kept in {dest}")
        return dest

    def close(self) -> None:
        """Stop everything (containerd first) and remove the work directory."""
        with contextlib.suppress(HarnessError):
            self.containerd.stop()
        for lz in self.lazysnaps.values():
            lz.stop()
            with contextlib.suppress(HarnessError):
                lz.cleanup()
        self.registry.stop()
        if self.wan is not None:
            self.wan.close()
        with contextlib.suppress(HarnessError):
            unmount_all_under(self.workdir)
        if os.environ.get("LAZYSNAP_BENCH_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- helpers the figures use ------------------------------------------------------------

    def ref(self, image: CachedImage, variant: Variant, tag: str = "") -> str:
        """The reference ``variant`` pulls: its tag (eStargz for lazy ones, nydus for
        lazysnap-nydus, else gzip) unless ``tag`` is given."""
        return image.ref(self.registry.host, tag or variant.tag)

    def pull(self, variant: Variant, ref: str) -> float:
        """Pull ``ref`` for ``variant`` (rpull or ``ctr image pull``); seconds taken."""
        for attempt in (1, 2):
            start = time.perf_counter()
            try:
                if variant.lazy:
                    self.containerd.rpull(ref, snapshotter=variant.name, timeout=1800)
                else:
                    self.containerd.pull(ref, snapshotter=variant.name, timeout=1800)
                return time.perf_counter() - start
            except CommandError as exc:
                # containerd sometimes fails to dial a proxy plugin that was just
                # restarted; that is the bench's doing, not the snapshotter's: say so,
                # keep the logs, and try once more (only the retry is timed).
                if attempt == 2 or not variant.ours or "unavailable" not in str(exc):
                    raise
                self.retries.append(f"{variant.name} {ref}: {exc.result.stderr.strip()}")
                self.log(f"  pull failed, retrying once: {self.retries[-1]}")
                self.keep_logs()
                self.remove_images()
                drop_caches()
                self._wait_reachable(variant.name)
        raise AssertionError("unreachable")

    def timed_ctr(self, *args: str, timeout: float = 1800) -> tuple[float, str]:
        """Run ``ctr ARGS`` (CommandError on failure); (seconds, stdout)."""
        start = time.perf_counter()
        result = self.containerd.ctr(*args, timeout=timeout)
        return time.perf_counter() - start, result.stdout

    def remove_images(self) -> None:
        """Remove every image with a synchronous GC, so content and snapshots go too."""
        names = self.containerd.ctr("image", "ls", "-q").stdout.split()
        if names:
            self.containerd.ctr("image", "rm", "--sync", *names, timeout=600)

    def restart_lazysnap(self, name: str) -> None:
        """Stop the lazysnap instance, wipe its root (chunk cache included), start it."""
        lz = self.lazysnaps[name]
        lz.stop()
        lz.cleanup()
        shutil.rmtree(lz.root, ignore_errors=True)
        lz.start()
        self._wait_reachable(name)

    def _wait_reachable(self, name: str) -> None:
        """Wait until containerd reaches proxy snapshotter ``name`` again.

        containerd keeps its connection to a proxy plugin; after a restart, calls fail
        with UNAVAILABLE until gRPC has dialled again (with a back-off of up to 3 s).
        ``ctr snapshots ls`` never reaches the plugin (containerd answers it from its own
        database), so the probe is a Prepare and a Remove, twice in a row.
        """
        streak = [0]

        def reconnected() -> bool:
            key = f"bench-probe-{uuid.uuid4().hex[:8]}"
            ok = self.containerd.ctr("snapshots", "--snapshotter", name, "prepare", key,
                                     check=False).returncode == 0
            if ok:
                self.containerd.ctr("snapshots", "--snapshotter", name, "rm", key,
                                    check=False)
            streak[0] = streak[0] + 1 if ok else 0
            return streak[0] >= 2

        wait_until(reconnected, timeout=60, what=f"containerd reaching {name} again")

    def cold(self, variant: Variant) -> None:
        """Make ``variant`` cold: images gone, lazysnap restarted empty, page cache dropped."""
        self.remove_images()
        if variant.ours:
            self.restart_lazysnap(variant.name)
        drop_caches()

    def daemon_pids(self, name: str) -> list[int]:
        """Pids of the FUSE daemons of lazysnap instance ``name``."""
        root = str(self.lazysnaps[name].root)
        return [p.pid for p in processes_mentioning(root)
                if "snapshotter.fs" in " ".join(p.argv)]




def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (shared pages divided among their users;
    0 if it is gone): what a process really costs when many share libraries."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_quiet(argv: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing output; CommandError-like HarnessError on failure."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                            timeout=timeout)
    if result.returncode != 0:
        raise HarnessError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr}")
    return result
