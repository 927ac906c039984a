"""A daemon mounts an eStargz layer from the TOC the snapshotter already checked.

The TOC file spares the footer and TOC requests; a missing or tampered file makes the
daemon fetch them itself, and a spec naming a TOC file is validated.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.daemonapi.specs import LayerSpec
from snapshotter.errdefs import DaemonError, InvalidArgument
from snapshotter.formats import estargz
from snapshotter.formats.limits import TocLimits
from snapshotter.fs.layers import LayerManager
from snapshotter.fs.ops import LayerOperations
from snapshotter.registry.base import BlobFetcher
from tests import estargz_writer as ew
from tests.unit.test_fs_fakes import FakeFetcher


class Source:
    def __init__(self, blob: bytes) -> None:
        self.fetcher = FakeFetcher(blob)
        self.sizes: list[int | None] = []

    async def open_blob(self, ref: str, digest: str, size: int | None = None
                        ) -> BlobFetcher:
        self.sizes.append(size)
        return self.fetcher

    async def aclose(self) -> None:
        pass


def layer() -> tuple[ew.EStargzBlob, int]:
    built = ew.build_estargz([ew.directory("d"), ew.reg("d/f", b"hello\n" * 100)])
    footer = estargz.parse_footer(built.blob[-estargz.FOOTER_MAX:])
    return built, footer.toc_offset


def spec_for(built: ew.EStargzBlob, toc_offset: int, toc_file: Path | None) -> LayerSpec:
    extra: dict[str, object] = {}
    if toc_file is not None:
        extra = {"toc_file": str(toc_file), "blob_size": len(built.blob),
                 "toc_offset": toc_offset}
    return LayerSpec.from_json({
        "layer_id": 1, "ref": "127.0.0.1:5000/img:1", "digest": ew.sha256(built.blob),
        "toc_digest": built.toc_digest, **extra})


async def mount(tmp_path: Path, spec: LayerSpec, source: Source) -> LayerManager:
    manager = LayerManager(mode="dedicated", mountpoint=str(tmp_path / "mnt"),
                           ops=LayerOperations(shared=False),
                           cache=ChunkCache(tmp_path / "cache", 1 << 24), source=source)
    await manager.add_layer(spec)
    await manager.wait_ready(1, 30)
    return manager


async def test_the_toc_file_spares_every_request(tmp_path: Path) -> None:
    built, toc_offset = layer()
    toc_file = tmp_path / "1.json"
    toc_file.write_bytes(built.toc_json)
    source = Source(built.blob)
    manager = await mount(tmp_path, spec_for(built, toc_offset, toc_file), source)
    try:
        for _ in range(100):  # the warm-up runs next to the mount; let it finish
            if source.fetcher.calls:
                break
            await asyncio.sleep(0.01)
        # Neither footer nor TOC was fetched: the one request is the connection warm-up.
        assert source.fetcher.calls == [[(0, 1)]]
        assert source.sizes == [len(built.blob)]  # and the size came with the spec
    finally:
        await manager.aclose()


@pytest.mark.parametrize("damage", ["missing", "tampered"])
async def test_an_unusable_toc_file_means_fetching_the_toc(tmp_path: Path, damage: str) -> None:
    built, toc_offset = layer()
    toc_file = tmp_path / "1.json"
    if damage == "tampered":
        toc_file.write_bytes(built.toc_json.replace(b'"d/f"', b'"d/g"'))
    source = Source(built.blob)
    manager = await mount(tmp_path, spec_for(built, toc_offset, toc_file), source)
    try:
        assert source.fetcher.calls[:2] == [[(len(built.blob) - estargz.FOOTER_MAX,
                                              len(built.blob))],
                                            [(toc_offset, len(built.blob) - estargz.FOOTER_MAX)]]
        # footer, then TOC (and the one-byte warm-up, whenever it ran)
        assert manager.status().layers[0].ready
    finally:
        await manager.aclose()


def test_a_toc_file_needs_the_blob_geometry() -> None:
    built, toc_offset = layer()
    base = spec_for(built, toc_offset, Path("/x/1.json")).to_json()
    for bad in ({"blob_size": None}, {"toc_offset": None}, {"toc_file": "rel.json"},
                {"toc_offset": len(built.blob)}, {"format": "rafs-v6"}):
        with pytest.raises(InvalidArgument):
            LayerSpec.from_json({**base, **bad})


@pytest.mark.parametrize("with_file", [True, False])
async def test_a_toc_over_the_daemons_limits_is_refused_with_its_reason(
        tmp_path: Path, with_file: bool) -> None:
    built = ew.build_estargz([ew.reg(f"d{i}/a/b/c/f", b"x") for i in range(10)])
    toc_offset = estargz.parse_footer(built.blob[-estargz.FOOTER_MAX:]).toc_offset
    toc_file = tmp_path / "1.json"
    toc_file.write_bytes(built.toc_json)
    source = Source(built.blob)
    manager = LayerManager(mode="dedicated", mountpoint=str(tmp_path / "mnt"),
                           ops=LayerOperations(shared=False),
                           cache=ChunkCache(tmp_path / "cache", 1 << 24), source=source,
                           limits=TocLimits(implicit_dirs=20))  # the layer implies 40
    try:
        await manager.add_layer(spec_for(built, toc_offset, toc_file if with_file else None))
        with pytest.raises(DaemonError, match=r"^limit_exceeded: .*implies more directories"):
            await manager.wait_ready(1, 30)
        if with_file:  # the same TOC is not fetched again to be refused twice
            assert all((toc_offset, len(built.blob) - estargz.FOOTER_MAX) not in call
                       for call in source.fetcher.calls)
    finally:
        await manager.aclose()
