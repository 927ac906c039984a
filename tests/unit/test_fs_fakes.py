"""Fakes shared by the FUSE daemon unit tests (an in-memory blob fetcher, a layer builder),
plus tests of the fakes themselves so that the other tests can trust them."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

import pytest

from snapshotter.errdefs import RangeNotSatisfiable
from snapshotter.formats.index import ROOT_INO, Chunk, LayerIndex, Node, NodeKind


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeFetcher:
    """A ``BlobFetcher`` over bytes in memory.

    ``calls`` records every ``fetch`` call's ranges. ``gate``, when set, makes ``fetch``
    wait for it (to hold fetches in flight). ``fail`` is raised by ``fetch`` while set.
    """

    def __init__(self, blob: bytes, digest: str | None = None) -> None:
        self.blob = blob
        self._digest = digest or sha256(blob)
        self.calls: list[list[tuple[int, int]]] = []
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None
        self.closed = False
        self.started = asyncio.Event()

    @property
    def digest(self) -> str:
        return self._digest

    async def size(self) -> int:
        return len(self.blob)

    async def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls.append(list(ranges))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        for start, end in ranges:
            if not 0 <= start < end <= len(self.blob):
                raise RangeNotSatisfiable(f"range {start}-{end} of {len(self.blob)}")
        return [self.blob[s:e] for s, e in ranges]

    async def aclose(self) -> None:
        self.closed = True

    @property
    def fetched_ranges(self) -> list[tuple[int, int]]:
        return [r for call in self.calls for r in call]


class LayerBuilder:
    """Builds a ``LayerIndex`` by hand; file data goes into a blob uncompressed
    (compression ``none``, per-chunk sha256 digests), so no format module is involved."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.nodes: dict[int, Node] = {
            ROOT_INO: Node(ino=ROOT_INO, kind=NodeKind.DIR, mode=0o755, nlink=2, parent=ROOT_INO)
        }
        self._next = 2

    def _add(self, parent: int, name: str, node: Node) -> Node:
        self.nodes[node.ino] = node
        self.nodes[parent].children[name] = node.ino
        node.parent = parent
        return node

    def _ino(self) -> int:
        ino = self._next
        self._next += 1
        return ino

    def dir(self, parent: int, name: str, **kw: object) -> Node:
        node = Node(ino=self._ino(), kind=NodeKind.DIR, mode=0o755, nlink=2)
        for k, v in kw.items():
            setattr(node, k, v)
        self.nodes[parent].nlink += 1
        return self._add(parent, name, node)

    def file(self, parent: int, name: str, data: bytes, chunk_size: int = 1 << 20,
             **kw: object) -> Node:
        node = Node(ino=self._ino(), kind=NodeKind.REG, mode=0o644, size=len(data))
        for k, v in kw.items():
            setattr(node, k, v)
        for off in range(0, len(data), chunk_size):
            piece = data[off : off + chunk_size]
            start = len(self.blob)
            self.blob += piece
            node.chunks.append(
                Chunk(file_offset=off, size=len(piece), blob_offset=start,
                      blob_end=len(self.blob), inner_offset=0, digest=sha256(piece),
                      compression="none")
            )
        node.digest = sha256(data)
        return self._add(parent, name, node)

    def symlink(self, parent: int, name: str, target: bytes) -> Node:
        node = Node(ino=self._ino(), kind=NodeKind.SYMLINK, mode=0o777,
                    link_target=target, size=len(target))
        return self._add(parent, name, node)

    def device(self, parent: int, name: str, kind: NodeKind, major: int, minor: int) -> Node:
        node = Node(ino=self._ino(), kind=kind, mode=0, rdev_major=major, rdev_minor=minor)
        return self._add(parent, name, node)

    def hardlink(self, parent: int, name: str, target: Node) -> Node:
        target.nlink += 1
        self.nodes[parent].children[name] = target.ino
        return target

    def build(self, **kw: object) -> tuple[LayerIndex, bytes]:
        blob = bytes(self.blob) or b"\0"
        index = LayerIndex(nodes=self.nodes, format="test", blob_size=len(blob))
        for k, v in kw.items():
            setattr(index, k, v)
        index.validate()
        return index, blob


# --- tests of the fakes ----------------------------------------------------------------------


async def test_fake_fetcher_returns_ranges_and_records_calls() -> None:
    f = FakeFetcher(b"0123456789")
    assert await f.fetch([(0, 2), (5, 10)]) == [b"01", b"56789"]
    assert f.calls == [[(0, 2), (5, 10)]]
    assert await f.size() == 10
    with pytest.raises(RangeNotSatisfiable):
        await f.fetch([(5, 11)])


def test_layer_builder_makes_a_valid_index() -> None:
    b = LayerBuilder()
    d = b.dir(ROOT_INO, "d")
    f = b.file(d.ino, "f", b"x" * 25, chunk_size=10)
    b.hardlink(ROOT_INO, "h", f)
    index, blob = b.build()
    assert [c.size for c in f.chunks] == [10, 10, 5]
    assert index.nodes[ROOT_INO].nlink == 3 and f.nlink == 2
    assert blob[f.chunks[2].blob_offset : f.chunks[2].blob_end] == b"x" * 5


def test_index_path_of_names_a_node_from_the_root() -> None:
    b = LayerBuilder()
    d = b.dir(ROOT_INO, "usr")
    lib = b.dir(d.ino, "lib")
    f = b.file(lib.ino, "libc.so.6", b"x")
    b.hardlink(ROOT_INO, "alias", f)
    index, _ = b.build()
    assert index.path_of(index.root) == ""
    assert index.path_of(lib) == "usr/lib"
    assert index.path_of(f) == "usr/lib/libc.so.6"  # a hard link: one of its names
    assert index.resolve(index.path_of(f)) is f
