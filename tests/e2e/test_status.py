"""Issue 6, end to end: ``lazysnap status`` against a known state.

One eStargz layer pulled lazily (a remote snapshot with its FUSE daemon) and one plain
gzip layer pulled through the fallback (a local snapshot). ``lazysnap status`` lists both
and exits 0; after the daemon is killed (with ``restart_limit = 0`` the manager gives up
on it at once) it exits non-zero and the remote snapshot's row says its daemon failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from .conftest import LazysnapFactory
from .harness import REPO_ROOT, Containerd, Lazysnap, Registry
from .imagebuild import OCI_MANIFEST, build_and_push
from .procs import wait_until
from .test_metrics import DEADLINE, data_layer, http_get, push_and_convert

pytestmark = pytest.mark.e2e


def lazysnap_status(lz: Lazysnap, *args: str) -> subprocess.CompletedProcess[str]:
    """``lazysnap status --root R --config C ARGS`` from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", "status", "--root", str(lz.root),
         "--config", str(lz.config_path), *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False)


def status_json(lz: Lazysnap) -> tuple[int, dict[str, Any]]:
    result = lazysnap_status(lz, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def layer_digests(registry: Registry, ref: str) -> list[str]:
    """The layer digests of the manifest ``ref`` (``host/name:tag``) names."""
    name, _, tag = ref.removeprefix(f"{registry.host}/").rpartition(":")
    raw = http_get(f"{registry.url}/v2/{name}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    return [layer["digest"] for layer in json.loads(raw)["layers"]]


@pytest.fixture
def status_lazysnap(lazysnap_factory: LazysnapFactory) -> Lazysnap:
    """lazysnap that gives up on a dead daemon at once; started before ``containerd``
    (see ``test_metrics.metrics_lazysnap`` for why)."""
    return lazysnap_factory('[metrics]\naddress = ""\n[daemon]\nrestart_limit = 0\n')


def test_status_reports_a_killed_daemon(
    registry: Registry, status_lazysnap: Lazysnap, containerd: Containerd,
) -> None:
    lz = status_lazysnap
    _, esgz = push_and_convert(containerd, registry, "lazysnap/status-e2e",
                               [data_layer(5, 300_000)])
    containerd.rpull(esgz, snapshotter="lazysnap")
    plain = build_and_push(registry.host, "lazysnap/status-plain", "gzip",
                           [data_layer(9, 1000)], cmd=["/bin/sh"])
    containerd.rpull(plain.reference, snapshotter="lazysnap")
    (esgz_digest,) = layer_digests(registry, esgz)

    code, status = status_json(lz)
    assert code == 0 and status["healthy"] is True, status
    rows = {s["digest"]: s for s in status["snapshots"]}
    assert set(rows) == {esgz_digest, plain.layers[0].digest}, status["snapshots"]
    remote, local = rows[esgz_digest], rows[plain.layers[0].digest]
    assert (remote["remote"], remote["kind"], remote["format"], remote["state"]) == (
        True, "committed", "estargz", "running")
    assert remote["total_bytes"] > 0 and remote["fetched_bytes"] >= 0
    assert remote["mountpoint"] == str(lz.root / "snapshots" / str(remote["id"]) / "fs")
    assert (local["remote"], local["kind"], local["daemon"], local["down"]) == (
        False, "committed", None, False)
    (daemon,) = status["daemons"]
    assert daemon["pid"] == remote["daemon_pid"] and daemon["health"] == "running"
    text = lazysnap_status(lz)
    assert text.returncode == 0 and "SNAPSHOTS" in text.stdout and "CACHE" in text.stdout

    os.kill(remote["daemon_pid"], signal.SIGKILL)

    def failed() -> dict[str, Any] | None:
        code, status = status_json(lz)
        rows = {s["digest"]: s for s in status["snapshots"]}
        return rows[esgz_digest] if code == 1 and rows[esgz_digest]["state"] == "failed" else None

    row = wait_until(failed, timeout=DEADLINE, what="status to report the failed daemon")
    assert row["down"] is True and row["daemon_pid"] == remote["daemon_pid"]
    text = lazysnap_status(lz)
    assert text.returncode == 1
    (line,) = [ln for ln in text.stdout.splitlines() if f" {remote['key']} " in ln]
    assert "remote" in line and "DOWN: failed" in line, line
    (local_line,) = [ln for ln in text.stdout.splitlines() if f" {local['key']} " in ln]
    assert "local" in local_line and "DOWN" not in local_line
    assert "1 remote snapshot(s) down" in text.stdout
