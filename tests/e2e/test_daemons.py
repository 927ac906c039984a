"""Issue 3, the FUSE daemons' lives: a daemon killed with SIGKILL is restarted and serves
again; ``lazysnap serve`` killed with SIGKILL leaves its daemons (and the containers that
read through them) running, and re-attaches to the same processes when it starts again.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from .conftest import StackFactory
from .daemon_records import FUSE_FSTYPE
from .esgz import FeatureImage
from .esgz_observe import (
    assert_no_leftovers,
    assert_remote_layers,
    fs_dir,
    layer_rows,
    lazysnap_config,
    live_daemon_records,
    mount_at,
    remove_image,
)
from .harness import CommandError
from .procs import wait_until
from .stack import Stack

pytestmark = pytest.mark.e2e
DEADLINE = 60.0
SAMPLE = ("/data/big.bin", "/many/f0001", "/data/dir/new.txt", "/data/private/secret.txt")


def _layers_served(stack: Stack, chain: tuple[str, ...]) -> bool:
    """True when every layer's ``fs`` is a live lazysnap FUSE mount (listable)."""
    root = stack.require_lazysnap().root
    for row in layer_rows(root, chain):
        if row is None:
            return False
        path = fs_dir(root, row)
        mount = mount_at(path)
        if mount is None or mount.fstype != FUSE_FSTYPE:
            return False
        try:
            os.listdir(path)
        except OSError:
            return False
    return True


def _md5_lines(feature: FeatureImage, paths: tuple[str, ...]) -> list[str]:
    return [f"{feature.esgz.tree[p].md5}  {p}" for p in paths]


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_killed_daemon_is_restarted_and_serves_again(
    mode: str, lazysnap_stack: StackFactory, feature_image: FeatureImage,
) -> None:
    """SIGKILL of the daemon serving the data layer: it is started again (a new pid, the
    other daemons untouched), the layer's mount serves again, a new container reads the
    image, and removing the image still leaves nothing behind."""
    stack = lazysnap_stack(lazysnap_config(mode))
    lz, image = stack.require_lazysnap(), feature_image.esgz
    stack.containerd.rpull(image.reference, snapshotter="lazysnap")
    before = live_daemon_records(lz.root)
    data_row = layer_rows(lz.root, image.chain_ids)[1]
    assert data_row is not None
    victim = "shared" if mode == "shared" else f"layer-{data_row.id}"
    os.kill(before[victim], signal.SIGKILL)

    def restarted() -> bool:
        pid = live_daemon_records(lz.root).get(victim)
        return pid is not None and pid != before[victim] and \
            _layers_served(stack, image.chain_ids)

    wait_until(restarted, timeout=DEADLINE, what=f"daemon {victim} to be restarted")
    after = live_daemon_records(lz.root)
    assert {k: v for k, v in after.items() if k != victim} == \
        {k: v for k, v in before.items() if k != victim}
    assert_remote_layers(stack, image.chain_ids, mode)
    out = stack.containerd.run_container(image.reference, "after-restart", "md5sum", *SAMPLE,
                                         snapshotter="lazysnap").stdout
    assert out.splitlines() == _md5_lines(feature_image, SAMPLE)
    remove_image(stack, image.reference)
    assert_no_leftovers(stack)


LOOP = ('for f in /many/*; do md5sum "$f" || echo "READ-FAILED $f"; sleep 0.05; done; '
        "echo LOOP-DONE")


def _loop_lines(log: Path) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _wait_more_lines(log: Path, than: int, what: str) -> int:
    """Wait until the container wrote 20 lines more than ``than``; return the count."""
    want = than + 20
    wait_until(lambda: len(_loop_lines(log)) >= want, timeout=DEADLINE, what=what)
    return len(_loop_lines(log))


def _wait_containerd_reconnects(stack: Stack) -> None:
    """containerd backs off after failed dials; wait until it reaches lazysnap again."""
    def answers() -> bool:
        try:
            stack.snapshots_ctr("ls")
        except CommandError:
            return False
        return True

    wait_until(answers, timeout=DEADLINE, what="containerd to reach lazysnap again")


def _remove_task(stack: Stack, name: str) -> None:
    """SIGKILL a detached container's task, wait until it stopped, delete it and the
    container."""
    ctd = stack.containerd
    ctd.ctr("tasks", "kill", "-s", "SIGKILL", name)

    def stopped() -> bool:
        rows = [line.split() for line in ctd.ctr("tasks", "ls").stdout.splitlines()[1:]]
        return all(row[0] != name or row[-1] == "STOPPED" for row in rows if row)

    wait_until(stopped, timeout=DEADLINE, what=f"task {name} to stop")
    ctd.ctr("tasks", "delete", name)
    ctd.ctr("containers", "rm", name)


def test_lazysnap_crash_keeps_containers_reading_and_reattaches(
    lazysnap_stack: StackFactory, feature_image: FeatureImage, e2e_workdir: Path,
) -> None:
    """A container reads a new file every 50 ms while ``lazysnap serve`` is SIGKILLed and
    started again: no read fails, every md5 is right, and the restarted lazysnap
    re-attaches to the very same daemon processes (same pids, a new container starts)."""
    stack = lazysnap_stack(lazysnap_config())
    lz, image, ctd = stack.require_lazysnap(), feature_image.esgz, stack.containerd
    ctd.rpull(image.reference, snapshotter="lazysnap")
    before = live_daemon_records(lz.root)
    assert len(before) == len(image.chain_ids), before
    log = e2e_workdir / "reader.log"
    ctd.run_container(image.reference, "reader", "sh", "-c", LOOP, snapshotter="lazysnap",
                      detach=True, extra=("--log-uri", f"file://{log}"))
    seen = _wait_more_lines(log, 0, "the reader to start")
    lz.kill9()
    seen = _wait_more_lines(log, seen, "reads while lazysnap is down")
    assert live_daemon_records(lz.root) == before
    lz.start()
    _wait_containerd_reconnects(stack)
    assert live_daemon_records(lz.root) == before  # same processes, supervised again
    assert_remote_layers(stack, image.chain_ids, "dedicated")
    _wait_more_lines(log, seen, "reads after lazysnap is back")
    lines = _loop_lines(log)
    failed = [line for line in lines if "READ-FAILED" in line or ": " in line]
    assert failed == [], failed[:10]
    for line in lines:
        if line != "LOOP-DONE":
            digest, path = line.split("  ", 1)
            assert feature_image.esgz.tree[path].md5 == digest, line
    # Mounts() checks every remote lower layer with the daemon manager: a new container
    # starts only if lazysnap supervises the re-attached daemons.
    out = ctd.run_container(image.reference, "after-reattach", "md5sum", *SAMPLE,
                            snapshotter="lazysnap").stdout
    assert out.splitlines() == _md5_lines(feature_image, SAMPLE)
    _remove_task(stack, "reader")
    remove_image(stack, image.reference)
    assert_no_leftovers(stack)
