"""The control protocol end to end (real unix socket, real server and client) over a
LayerManager with fake blobs: no FUSE mount is involved."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.daemonapi.client import ControlClient
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.errdefs import (
    AlreadyExists,
    DaemonError,
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from snapshotter.formats.index import ROOT_INO, LayerIndex
from snapshotter.fs.control import ControlServer
from snapshotter.fs.layers import LayerManager
from snapshotter.fs.ops import LayerOperations
from snapshotter.registry.base import BlobFetcher
from tests.unit.test_fs_fakes import FakeFetcher, LayerBuilder, sha256

GOOD_TOC = "sha256:" + "1" * 64


def build_layer() -> tuple[LayerIndex, bytes]:
    b = LayerBuilder()
    a = b.file(ROOT_INO, "a", b"prefetched" * 100)
    b.file(ROOT_INO, "b", b"later" * 100)
    index, blob = b.build()
    index.prefetch_inos = [a.ino]
    return index, blob


class Source:
    """Fake BlobSource: one blob per digest; ``opened`` records (ref, digest)."""

    def __init__(self) -> None:
        self.index, blob = build_layer()
        self.fetcher = FakeFetcher(blob)
        self.opened: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def open_blob(self, ref: str, digest: str, size: int | None = None
                        ) -> BlobFetcher:
        self.opened.append((ref, digest))
        if self.gate is not None:
            await self.gate.wait()
        return self.fetcher

    async def aclose(self) -> None:
        self.closed = True

    async def open_layer(self, fetcher: BlobFetcher, toc: str | None
                         ) -> tuple[LayerIndex, bytes]:
        if toc not in (None, GOOD_TOC):
            raise DigestMismatch(f"TOC digest is {GOOD_TOC}, expected {toc}")
        return self.index, b"{}"


@dataclass
class Env:
    manager: LayerManager
    client: ControlClient
    source: Source
    ops: LayerOperations


def spec(layer_id: int = 1, **kw: object) -> LayerSpec:
    values: dict[str, object] = {
        "layer_id": layer_id, "ref": "127.0.0.1:5000/img:1", "digest": sha256(b"blob"),
        "toc_digest": GOOD_TOC, "prefetch_timeout_s": 30.0,
    }
    values.update(kw)
    return LayerSpec.from_json(values)


@pytest.fixture(params=["shared", "dedicated"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    mode = str(request.param)
    source = Source()
    ops = LayerOperations(shared=mode == "shared")
    manager = LayerManager(
        mode=mode, mountpoint=str(tmp_path / "mnt"), ops=ops,
        cache=ChunkCache(tmp_path / "cache", 1 << 24), source=source,
        openers={"estargz": source.open_layer},
    )
    path = str(tmp_path / "control.sock")
    server = ControlServer(manager, path)
    await server.start()
    try:
        yield Env(manager, ControlClient(path), source, ops)
    finally:
        await server.aclose()
        await manager.aclose()


async def test_add_wait_status_remove(env: Env) -> None:
    added = await env.client.add_layer(spec(4, background_fetch=True))
    assert added.layer_id == 4 and added.digest == sha256(b"blob")
    ready = await env.client.wait_ready(4, timeout=30)
    assert ready.ready and ready.prefetch_done and ready.error is None
    assert ready.total_bytes == env.source.index.blob_size
    assert env.source.opened == [("127.0.0.1:5000/img:1", sha256(b"blob"))]
    assert 4 in env.ops.layers
    status = await env.client.status()
    assert status.mode == env.manager.mode and status.rss_bytes > 0 and status.pid > 0
    assert [layer.layer_id for layer in status.layers] == [4]
    assert status.reader["fetched_bytes"] == status.layers[0].fetched_bytes > 0
    assert set(status.cache) >= {"hits", "misses", "size_bytes", "limit_bytes", "evictions"}
    await env.client.remove_layer(4)
    assert 4 not in env.ops.layers and (await env.client.status()).layers == []
    assert env.source.fetcher.closed
    with pytest.raises(NotFound):
        await env.client.remove_layer(4)


async def test_add_layer_accepts_the_json_form(env: Env) -> None:
    await env.client.add_layer(spec(2).to_json())
    assert (await env.client.wait_ready(2, 30)).ready


async def test_failures_carry_the_reason(env: Env) -> None:
    await env.client.add_layer(spec(1, toc_digest="sha256:" + "2" * 64))
    with pytest.raises(DaemonError, match=r"^digest_mismatch: "):
        await env.client.wait_ready(1, 30)
    status = (await env.client.status()).layers[0]
    assert not status.ready and (status.error or "").startswith("digest_mismatch")
    assert 1 not in env.ops.layers
    await env.client.remove_layer(1)
    await env.client.add_layer(spec(2, toc_digest=None))
    with pytest.raises(DaemonError, match=r"^no_toc_digest: "):
        await env.client.wait_ready(2, 30)
    await env.client.remove_layer(2)
    await env.client.add_layer(spec(3, toc_digest=None, skip_verify=True))
    assert (await env.client.wait_ready(3, 30)).ready


async def test_request_errors_are_typed(env: Env) -> None:
    await env.client.add_layer(spec(1))
    second = AlreadyExists if env.manager.mode == "shared" else FailedPrecondition
    with pytest.raises(AlreadyExists):
        await env.client.add_layer(spec(1))
    with pytest.raises(second):
        await env.client.add_layer(spec(2) if second is FailedPrecondition else spec(1))
    with pytest.raises(InvalidArgument, match="unknown layer spec keys"):
        await env.client.add_layer({**spec(5).to_json(), "bogus": 1})
    with pytest.raises(InvalidArgument):
        await env.client.add_layer({**spec(5).to_json(), "layer_id": "5"})
    with pytest.raises(NotFound):
        await env.client.wait_ready(99, 1)
    if env.manager.mode == "shared":
        with pytest.raises(InvalidArgument, match="layer ids"):
            await env.client.add_layer(spec(0))


async def test_wait_ready_long_polls_and_times_out(env: Env) -> None:
    env.source.gate = asyncio.Event()
    await env.client.add_layer(spec(1))
    with pytest.raises(DaemonError, match=r"not ready after"):
        await env.client.wait_ready(1, 0.05)
    waiter = asyncio.create_task(env.client.wait_ready(1, 30))
    await asyncio.sleep(0)
    env.source.gate.set()
    assert (await waiter).ready


async def test_shutdown_request_and_stopping_daemon(env: Env) -> None:
    env.source.gate = asyncio.Event()
    await env.client.add_layer(spec(1))
    waiter = asyncio.create_task(env.client.wait_ready(1, 30))
    await env.client.shutdown()
    assert env.manager.stop_requested.is_set()
    await env.manager.aclose()
    with pytest.raises(DaemonError, match="stopping"):
        await waiter


async def test_unreachable_socket_is_daemon_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="control socket"):
        await ControlClient(str(tmp_path / "none.sock")).status()


async def test_serves_an_inherited_listening_socket(tmp_path: Path) -> None:
    source = Source()
    manager = LayerManager(
        mode="shared", mountpoint="/x", ops=LayerOperations(shared=True),
        cache=ChunkCache(tmp_path / "c", 1 << 20), source=source,
        openers={"estargz": source.open_layer},
    )
    path = str(tmp_path / "activated.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    server = ControlServer(manager, path, sock=sock)
    await server.start()
    try:
        assert (await ControlClient(path).status()).mode == "shared"
    finally:
        await server.aclose()
        await manager.aclose()


def test_layer_spec_json_round_trip_and_validation() -> None:
    s = spec(7, background_rate_bytes_per_s=1000, readahead_chunks=2)
    assert LayerSpec.from_json(s.to_json()) == s
    assert LayerSpec.from_json({"layer_id": 1, "ref": "r", "digest": sha256(b"")}).format == (
        "estargz"
    )
    bad: object
    for bad in ({"layer_id": 1}, {**s.to_json(), "format": "zip"},
                {**s.to_json(), "skip_verify": 1}, {**s.to_json(), "digest": "md5:x"}, []):
        with pytest.raises(InvalidArgument):
            LayerSpec.from_json(bad)
