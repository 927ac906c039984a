"""The FUSE daemon's nydus path without a mount: the RAFS opener, the bootstrap file, the
per-blob fetchers, reads verified against chunk digests, prefetch and background fetch."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from snapshotter.cache.chunkcache import ChunkCache, chunk_key
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.daemonapi.status import LayerStatus
from snapshotter.errdefs import (
    BlobNotFound,
    DaemonError,
    DigestMismatch,
    FormatError,
    RangeNotSatisfiable,
)
from snapshotter.formats import chunkcodec
from snapshotter.formats.digests import sha256_digest
from snapshotter.formats.index import LayerIndex, Node, NodeKind
from snapshotter.fs import rafs_opener
from snapshotter.fs.layers import LayerManager
from snapshotter.fs.ops import LayerOperations
from snapshotter.registry.base import BlobFetcher
from snapshotter.tools.convert.tree import Spec
from snapshotter.tools.convert.write_v5 import write_v5
from snapshotter.tools.convert.write_v6 import write_v6
from tests.unit.test_fs_fakes import FakeFetcher
from tests.unit.test_nydus import boot_tar
from tests.unit.test_rafs_writer import FIXTURES

REF = "127.0.0.1:5000/nydus/app:latest"
V5 = FIXTURES / "rafs-v5-sha256-nocompress"
V6 = FIXTURES / "rafs-v6"


class FakeSource:
    """``BlobSource`` serving blobs by digest; records which digests were opened."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.fetchers = {d: FakeFetcher(b, d) for d, b in blobs.items()}
        self.opened: list[str] = []

    async def open_blob(self, ref: str, digest: str, size: int | None = None
                        ) -> BlobFetcher:
        assert ref == REF
        self.opened.append(digest)
        fetcher = self.fetchers.get(digest)
        if fetcher is None:
            raise BlobNotFound(f"no blob {digest}")
        return fetcher

    async def aclose(self) -> None:
        pass


def fixture_blobs(root: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (root / "blobs").iterdir()}


def write_bootstrap(tmp_path: Path, boot: bytes) -> Path:
    path = tmp_path / "snap" / "image.boot"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(boot)
    return path


Make = Callable[[FakeSource], LayerManager]


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[tuple[Make, LayerOperations]]:
    """A factory of shared-mode LayerManagers over one LayerOperations (not mounted)."""
    ops = LayerOperations(shared=True)
    made: list[LayerManager] = []

    def make(source: FakeSource) -> LayerManager:
        m = LayerManager(mode="shared", mountpoint=str(tmp_path / "mnt"), ops=ops,
                         cache=ChunkCache(tmp_path / "cache", 1 << 30), source=source)
        made.append(m)
        return m

    yield make, ops
    for m in made:
        await m.aclose()


def spec_for(path: Path, boot: bytes, fmt: str, **kw: object) -> LayerSpec:
    return LayerSpec(layer_id=1, ref=REF, digest="sha256:" + "9" * 64,
                     toc_digest=sha256_digest(boot), format=fmt, bootstrap=str(path),
                     **kw)  # type: ignore[arg-type]


async def read_all(ops: LayerOperations, layer_id: int, node: Node) -> bytes:
    reader = ops.layers[layer_id].reader
    return await reader.read(node, 0, node.size)


def expected(index: LayerIndex, blobs: dict[str, bytes], node: Node) -> bytes:
    return b"".join(chunkcodec.decode_chunk(blobs[f"sha256:{c.blob}"][c.blob_offset:c.blob_end],
                                            c) for c in node.chunks)


# --- the opener and the file fetcher ------------------------------------------------------


@pytest.mark.parametrize(("boot_path", "fmt"), [(V5 / "bootstrap", "rafs-v5"),
                                                (V6 / "rafs-v6-2.2.boot", "rafs-v6")])
async def test_open_layer_from_a_bootstrap_file(tmp_path: Path, boot_path: Path,
                                                fmt: str) -> None:
    boot = boot_path.read_bytes()
    path = write_bootstrap(tmp_path, boot)
    index, raw = await rafs_opener.open_layer(rafs_opener.FileBlob(str(path), "x"),
                                              sha256_digest(boot))
    assert raw == boot and index.format == fmt
    assert index.blob_size == sum(len(b) for b in fixture_blobs(boot_path.parent).values())


async def test_open_layer_accepts_a_bootstrap_layer_tar() -> None:
    boot = (V5 / "bootstrap").read_bytes()
    fetcher = FakeFetcher(boot_tar({"image/image.boot": boot}))
    index, raw = await rafs_opener.open_layer(fetcher, None)
    assert raw == boot and index.format == "rafs-v5"


async def test_open_layer_failures(tmp_path: Path) -> None:
    boot = (V5 / "bootstrap").read_bytes()
    with pytest.raises(DigestMismatch):
        await rafs_opener.open_layer(FakeFetcher(boot), "sha256:" + "0" * 64)
    with pytest.raises(FormatError):
        await rafs_opener.open_layer(FakeFetcher(b"\0" * 9000), None)
    blob = rafs_opener.FileBlob(str(tmp_path / "missing"), "x")
    with pytest.raises(BlobNotFound):
        await blob.size()
    present = rafs_opener.FileBlob(str(write_bootstrap(tmp_path, b"0123456789")), "x")
    assert await present.fetch([(2, 5), (0, 1)]) == [b"234", b"0"]
    with pytest.raises(RangeNotSatisfiable):
        await present.fetch([(5, 11)])


# --- LayerManager serving nydus layers ------------------------------------------------------


async def wait_status(m: LayerManager, want: str) -> LayerStatus:
    """Poll the layer's status until ``want`` is true (the background task is owned by the
    manager; a bounded wait, no timing assertion)."""
    for _ in range(2000):
        status = m.status().layers[0]
        if getattr(status, want):
            return status
        await asyncio.sleep(0.01)
    raise AssertionError(f"layer never became {want}: {m.status()}")


@pytest.mark.parametrize(("root", "name", "fmt"), [(V5, "bootstrap", "rafs-v5"),
                                                   (V6, "rafs-v6-2.2.boot", "rafs-v6")])
async def test_fixture_layers_read_through_the_data_blobs(
    tmp_path: Path, manager: tuple[Make, LayerOperations], root: Path, name: str, fmt: str,
) -> None:
    make, ops = manager
    boot = (root / name).read_bytes()
    blobs = fixture_blobs(root)
    source = FakeSource(blobs)
    m = make(source)
    await m.add_layer(spec_for(write_bootstrap(tmp_path, boot), boot, fmt))
    status = await m.wait_ready(1, 30)
    assert status.ready and status.error is None
    assert source.opened == sorted(blobs)  # one fetcher per data blob, none for the layer
    index = ops.layers[1].index
    files = [n for _, n in index.walk() if n.kind is NodeKind.REG]
    assert files
    for node in files:
        assert await read_all(ops, 1, node) == expected(index, blobs, node)


async def test_prefetch_table_is_fetched_before_ready(
    tmp_path: Path, manager: tuple[Make, LayerOperations],
) -> None:
    make, ops = manager
    hot, cold = bytes(range(256)) * 400, b"c" * 300_000
    out = write_v6([Spec("hot/a", "reg", data=hot), Spec("cold", "reg", data=cold)],
                   chunk_size=64 << 10, compression="zstd", prefetch=("hot",),
                   blob_trailer=True)
    blobs = {f"sha256:{k}": v for k, v in out.blobs.items()}
    m = make(FakeSource(blobs))
    await m.add_layer(spec_for(write_bootstrap(tmp_path, out.bootstrap), out.bootstrap,
                               "rafs-v6", background_fetch=False))
    status = await m.wait_ready(1, 30)
    assert status.prefetch_done
    index = ops.layers[1].index
    by_path = {p: n for p, n in index.walk()}
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    (digest,) = blobs
    assert all(cache.contains(chunk_key(c, digest)) for c in by_path["hot/a"].chunks)
    assert not any(cache.contains(chunk_key(c, digest)) for c in by_path["cold"].chunks)
    assert await read_all(ops, 1, by_path["cold"]) == cold


async def test_background_fetch_completes_the_layer(
    tmp_path: Path, manager: tuple[Make, LayerOperations],
) -> None:
    make, _ = manager
    data = hashlib.sha256(b"seed").digest() * 20_000
    out = write_v5([Spec("f", "reg", data=data), Spec("g", "reg", data=data[::-1])],
                   chunk_size=64 << 10, compression="lz4_block", blob_trailer=True)
    blobs = {f"sha256:{k}": v for k, v in out.blobs.items()}
    m = make(FakeSource(blobs))
    await m.add_layer(spec_for(write_bootstrap(tmp_path, out.bootstrap), out.bootstrap,
                               "rafs-v5", background_fetch=True))
    await m.wait_ready(1, 30)
    status = await wait_status(m, "fully_fetched")
    assert status.total_bytes == len(next(iter(blobs.values()))) - 512  # data, not trailer
    assert status.fetched_bytes >= status.total_bytes - 512


async def test_a_chunk_failing_its_digest_fails_that_read_only(
    tmp_path: Path, manager: tuple[Make, LayerOperations],
) -> None:
    make, ops = manager
    good, bad = b"good" * 1000, b"B" * 9000
    out = write_v6([Spec("good", "reg", data=good), Spec("bad", "reg", data=bad)])
    digest = bytes.fromhex(chunkcodec.compute_digest(bad, "blake3").split(":")[1])
    boot = out.bootstrap.replace(digest, bytes(b ^ 1 for b in digest))
    m = make(FakeSource({f"sha256:{k}": v for k, v in out.blobs.items()}))
    await m.add_layer(spec_for(write_bootstrap(tmp_path, boot), boot, "rafs-v6"))
    await m.wait_ready(1, 30)
    by_path = {p: n for p, n in ops.layers[1].index.walk()}
    with pytest.raises(DigestMismatch):
        await read_all(ops, 1, by_path["bad"])
    assert await read_all(ops, 1, by_path["good"]) == good
    assert m.status().layers[0].ready


async def test_a_replaced_bootstrap_file_is_refused(
    tmp_path: Path, manager: tuple[Make, LayerOperations],
) -> None:
    make, _ = manager
    boot = (V5 / "bootstrap").read_bytes()
    path = write_bootstrap(tmp_path, boot)
    spec = spec_for(path, boot, "rafs-v5")
    path.write_bytes(write_v5([Spec("x", "reg", data=b"x")]).bootstrap)
    m = make(FakeSource(fixture_blobs(V5)))
    await m.add_layer(spec)
    with pytest.raises(DaemonError, match="digest_mismatch"):
        await m.wait_ready(1, 30)
