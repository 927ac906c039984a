"""``lazysnap status`` over a real metastore, with a stand-in daemon process (a process
whose command line looks like a daemon's) and a fake control socket answer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter import labels as L
from snapshotter.cli import main
from snapshotter.config import Config
from snapshotter.daemonapi.status import DaemonStatus, LayerStatus
from snapshotter.errdefs import DaemonError
from snapshotter.metastore.daemons import DaemonRecord, DaemonState, DaemonTable
from snapshotter.metastore.store import MetaStore
from snapshotter.metrics.collector import StatusQuery
from snapshotter.model import Kind
from snapshotter.tools.status import (
    EXIT_DOWN,
    EXIT_OK,
    EXIT_UNREADABLE,
    gather_status,
    human_bytes,
    render_text,
    run_status,
    short_digest,
)

LOCAL_DIGEST = "sha256:" + "1" * 64
REMOTE_DIGEST = "sha256:" + "2" * 64
REF = "127.0.0.1:5000/img:1"


@dataclass
class World:
    root: Path
    config: Config
    store: MetaStore
    remote_id: int
    local_id: int
    control: str
    daemon: subprocess.Popen[bytes]

    def put_daemon(self, state: DaemonState = DaemonState.RUNNING, pid: int | None = None,
                   layers: tuple[int, ...] | None = None) -> None:
        ids = (self.remote_id,) if layers is None else layers
        DaemonTable(self.store).put(DaemonRecord(
            id=f"layer-{self.remote_id}", mode="dedicated", control=self.control,
            mountpoint=str(self.root / "snapshots" / str(self.remote_id) / "fs"),
            state=state, pid=self.daemon.pid if pid is None else pid,
            spec={"layers": [{"layer_id": i} for i in ids]}))


def _commit(store: MetaStore, key: str, name: str, labels: dict[str, str]) -> int:
    with store.write() as tx:
        tx.create(key, "", Kind.ACTIVE, {}, 1)
        return tx.commit(key, name, labels, 0, 0, 2).id


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "root"
    root.mkdir()
    store = MetaStore(root / "metadata.db")
    local = _commit(store, "extract-1", "sha256:chain-local",
                    {L.STARGZ_REFERENCE: REF, L.STARGZ_DIGEST: LOCAL_DIGEST})
    remote = _commit(store, "extract-2", "sha256:chain-remote", {
        L.STARGZ_REFERENCE: REF, L.STARGZ_DIGEST: REMOTE_DIGEST, L.REMOTE: L.REMOTE_VALUE,
        L.REMOTE_FORMAT: "estargz"})
    control = str(tmp_path / "layer.sock")
    # Alive until its stdin closes, with the command line a daemon of `control` has; its
    # first line says it runs (before that, /proc may still show pytest's command line).
    daemon = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()",
         "snapshotter.fs", "--control", control], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert daemon.stdout is not None and daemon.stdout.readline() == b"up\n"
    cache = root / "cache" / "sha256" / "ab"
    cache.mkdir(parents=True)
    (cache / ("ab" * 32)).write_bytes(b"x" * 1000)
    config = Config(root=str(root))
    try:
        yield World(root, config, store, remote, local, control, daemon)
    finally:
        daemon.kill()
        daemon.wait()
        for pipe in (daemon.stdin, daemon.stdout):
            if pipe is not None:
                pipe.close()
        store.close()


def answering(layer: LayerStatus | None, error: BaseException | None = None) -> StatusQuery:
    async def query(path: str, timeout: float) -> DaemonStatus:
        if error is not None:
            raise error
        return DaemonStatus(state="running", pid=1, mode="dedicated", mountpoint="/m",
                            layers=[layer] if layer else [],
                            cache={"hits": 5, "misses": 2, "size_bytes": 1000})
    return query


def layer_status(world: World, **kw: object) -> LayerStatus:
    values: dict[str, object] = {
        "layer_id": world.remote_id, "digest": REMOTE_DIGEST, "ready": True, "error": None,
        "fetched_bytes": 256, "total_bytes": 1024, "fully_fetched": False,
        "prefetch_done": True}
    values.update(kw)
    return LayerStatus(**values)  # type: ignore[arg-type]


async def test_healthy_remote_and_local_rows(world: World) -> None:
    world.put_daemon()
    status = await gather_status(world.config, query=answering(layer_status(world)))
    assert status.down == []
    rows = {s.id: s for s in status.snapshots}
    remote, local = rows[world.remote_id], rows[world.local_id]
    assert (remote.remote, remote.kind, remote.format, remote.digest) == (
        True, "committed", "estargz", REMOTE_DIGEST)
    assert (remote.daemon, remote.daemon_pid, remote.state) == (
        f"layer-{world.remote_id}", world.daemon.pid, "running")
    assert (remote.fetched_bytes, remote.total_bytes, remote.percent) == (256, 1024, 25.0)
    assert remote.mountpoint == str(world.root / "snapshots" / str(world.remote_id) / "fs")
    assert (local.remote, local.digest, local.daemon, local.down) == (
        False, LOCAL_DIGEST, None, False)
    (daemon,) = status.daemons
    assert daemon.health == "running" and daemon.rss_bytes > 0
    assert (status.cache.size_bytes, status.cache.files, status.cache.hits) == (1000, 1, 5)
    text = render_text(status)
    assert "sha256:chain-remote" in text and "256B/1.0KiB" in text and "25.0%" in text
    assert "DOWN" not in text


@pytest.mark.parametrize(("case", "expected"), [
    ("dead", "dead"), ("failed", "failed"), ("unreachable", "unreachable"),
    ("layer_failed", "layer failed: digest_mismatch: x"), ("not_served", "layer not served"),
    ("no_daemon", "no daemon"),
])
async def test_a_remote_snapshot_whose_daemon_is_down(world: World, case: str,
                                                      expected: str) -> None:
    query = answering(layer_status(world))
    if case == "dead":
        world.daemon.kill()
        world.daemon.wait()
        world.put_daemon()
    elif case == "failed":
        world.put_daemon(DaemonState.FAILED)
    elif case == "unreachable":
        world.put_daemon()
        query = answering(None, DaemonError("connection refused"))
    elif case == "layer_failed":
        world.put_daemon()
        query = answering(layer_status(world, ready=False, error="digest_mismatch: x"))
    elif case == "not_served":
        world.put_daemon()
        query = answering(None)
    status = await gather_status(world.config, query=query)
    (down,) = status.down
    assert down.id == world.remote_id and down.state == expected
    assert f"DOWN: {expected}" in render_text(status)
    assert status.to_json()["healthy"] is False


async def test_a_layer_being_prepared_is_not_down(world: World) -> None:
    world.put_daemon()
    layer = layer_status(world, ready=False, total_bytes=0, fetched_bytes=0)
    status = await gather_status(world.config, query=answering(layer))
    assert status.down == []
    assert [s.state for s in status.snapshots if s.remote] == ["preparing"]
    assert [s.percent for s in status.snapshots if s.remote] == [None]


def test_cli_exit_codes_and_json(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(world.root)
    world.daemon.kill()
    world.daemon.wait()
    world.put_daemon()
    assert main(["status", "--root", root, "--json", "--timeout", "1"]) == EXIT_DOWN
    out = json.loads(capsys.readouterr().out)
    assert out["healthy"] is False
    remote = next(s for s in out["snapshots"] if s["remote"])
    assert (remote["state"], remote["down"], remote["daemon_pid"]) == (
        "dead", True, world.daemon.pid)
    assert [d["health"] for d in out["daemons"]] == ["dead"]
    assert main(["status", "--root", root]) == EXIT_DOWN
    assert "DOWN: dead" in capsys.readouterr().out
    with world.store.write() as tx:  # without the remote snapshot everything is fine
        tx.remove("sha256:chain-remote")
    assert main(["status", "--root", root]) == EXIT_OK
    text = capsys.readouterr().out
    assert "sha256:chain-local" in text and "local" in text


def test_missing_metastore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_status(Config(root=str(tmp_path)), as_json=False, timeout=1)
    assert code == EXIT_UNREADABLE
    assert "no lazysnap metastore" in capsys.readouterr().err
    (tmp_path / "metadata.db").write_bytes(b"not a database" * 100)
    assert run_status(Config(root=str(tmp_path)), as_json=True, timeout=1) == EXIT_UNREADABLE


def test_formatting_helpers() -> None:
    assert [human_bytes(n) for n in (None, 0, 1023, 1024, 5 << 30)] == [
        "-", "0B", "1023B", "1.0KiB", "5.0GiB"]
    assert short_digest(REMOTE_DIGEST) == "sha256:222222222222"
    assert short_digest(None) == short_digest("") == "-"
