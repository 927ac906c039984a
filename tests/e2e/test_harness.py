"""The harness's own start-up, restart, failure-reporting and teardown paths.

Later tests stop the registry mid-read, crash containerd or lazysnap and rely on the
fixtures to clean up; these tests make sure that works and that nothing is left behind.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .demo import DemoImage
from .harness import SHIM_SOCKET_DIR, Containerd, Lazysnap, Registry
from .imagebuild import push_blob
from .procs import HarnessError, mounts_under, processes_mentioning
from .stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("e2e_prerequisites")]


def _reachable(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5):
            return True
    except (urllib.error.URLError, OSError):
        return False


def test_registry_restarts_on_the_same_port_with_its_storage(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    try:
        reg.start()
        host = reg.host
        digest = push_blob(host, "harness/blob", b"kept across restarts")
        reg.stop()
        assert not _reachable(f"http://{host}/v2/")
        reg.start()
        assert reg.host == host
        assert _reachable(f"http://{host}/v2/harness/blob/blobs/{digest}")
    finally:
        reg.stop()
    assert processes_mentioning(str(reg.config_path)) == []


def test_registry_start_failure_reports_the_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        reg = Registry(tmp_path / "registry", port=squatter.getsockname()[1])
        with pytest.raises(HarnessError, match="address already in use") as info:
            reg.start(timeout=30)
    assert "last lines of" in str(info.value)
    assert processes_mentioning(str(reg.config_path)) == []


def test_lazysnap_start_failure_reports_the_log(tmp_path: Path) -> None:
    proc = Lazysnap(tmp_path / "lazysnap", config_text="[[[ this is not TOML\n")
    with pytest.raises(HarnessError, match="lazysnap did not start") as info:
        proc.start(timeout=60)
    assert f"last lines of {proc.log_path}" in str(info.value)
    assert not proc.running()
    assert proc.cleanup() == []


def test_lazysnap_survives_kill9_and_restart(tmp_path: Path) -> None:
    proc = Lazysnap(tmp_path / "lazysnap")
    try:
        proc.start()
        first = proc.pid
        proc.kill9()
        assert not proc.running()
        proc.start()
        assert proc.running() and proc.pid != first
    finally:
        proc.stop()
    assert proc.cleanup() == []


def _shim_socket(ctd: Containerd, container_id: str) -> Path:
    key = os.path.join(str(ctd.socket), ctd.namespace, container_id)
    return SHIM_SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()


def test_containerd_crash_leaves_nothing_after_stop(
    containerd: Containerd, demo_image: DemoImage
) -> None:
    """SIGKILL containerd under a running container: stop() still removes the shim, the
    container's processes, its rootfs mount and the shim's socket."""
    containerd.pull(demo_image.reference, snapshotter="overlayfs")
    containerd.run_container(demo_image.reference, "harness-crash", "sleep", "600",
                             snapshotter="overlayfs", detach=True)
    rows = containerd.ctr("tasks", "ls").stdout.splitlines()[1:]
    task_pid = int(next(r.split()[1] for r in rows if r.split()[0] == "harness-crash"))
    shims = containerd.leftover_shims()
    assert shims, "no shim found for the running container"
    assert _shim_socket(containerd, "harness-crash").exists()
    assert mounts_under(containerd.state), "the container's rootfs should be mounted"

    containerd.kill9()
    assert all(Path(f"/proc/{pid}").exists() for pid in [*shims, task_pid])
    containerd.stop()

    assert containerd.leftover_shims() == []
    assert processes_mentioning(str(containerd.socket)) == []
    assert not Path(f"/proc/{task_pid}").exists() or _is_zombie(task_pid)
    assert mounts_under(containerd.workdir) == []
    assert not _shim_socket(containerd, "harness-crash").exists()
    assert list(Path("/sys/fs/cgroup").glob(f"*/{containerd.namespace}")) == []
    containerd.stop()  # idempotent


def test_containerd_stop_removes_running_containers(
    containerd: Containerd, demo_image: DemoImage
) -> None:
    """A plain stop() with a container still running kills and deletes it through containerd
    first, so no shim has to be SIGKILLed and nothing stays mounted."""
    containerd.pull(demo_image.reference, snapshotter="overlayfs")
    containerd.run_container(demo_image.reference, "harness-stop", "sleep", "600",
                             snapshotter="overlayfs", detach=True)
    assert containerd.leftover_shims()
    containerd.stop()
    assert containerd.leftover_shims() == []
    assert mounts_under(containerd.workdir) == []
    assert not _shim_socket(containerd, "harness-stop").exists()


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.mark.parametrize("stack", ["overlayfs"], indirect=True)
def test_rpull_helper_unpacks_through_containerd(stack: Stack, demo_image: DemoImage) -> None:
    """``Containerd.rpull`` (ctr-remote) pulls and unpacks the demo image."""
    stack.containerd.rpull(demo_image.reference, snapshotter=stack.snapshotter)
    assert set(stack.list_snapshots()) == set(demo_image.image.chain_ids)
