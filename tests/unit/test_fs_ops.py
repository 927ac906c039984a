"""The FUSE request handlers, called directly (no mount): attributes, directories, reads,
xattrs, errno mapping, the dedicated and shared layouts, and the kernel notifications that
adding and removing layers sends."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RegistryTimeout,
)
from snapshotter.formats.index import ROOT_INO, LayerIndex, NodeKind
from snapshotter.fs.fuse.wire import FuseError
from snapshotter.fs.ops import ENOATTR, FuseTimeouts, LayerOperations, MountedLayer
from snapshotter.fs.read.reader import ChunkReader
from tests.unit.test_fs_fakes import FakeFetcher, LayerBuilder

MTIME = 1_700_000_000_123_456_789
BIG = 5003


def sample_layer() -> tuple[LayerIndex, bytes]:
    b = LayerBuilder()
    etc = b.dir(ROOT_INO, "etc", mode=0o750, uid=5, gid=6, mtime_ns=MTIME)
    b.file(etc.ino, "hosts", b"127.0.0.1 localhost\n", mode=0o640, uid=7, gid=8, mtime_ns=MTIME)
    big = b.file(ROOT_INO, "big", bytes(range(256)) * 100, chunk_size=1000, mode=0o755)
    b.hardlink(etc.ino, "big-link", big)
    b.symlink(ROOT_INO, "link", b"etc/hosts")
    b.device(ROOT_INO, "gone", NodeKind.CHAR, 0, 0)  # a whiteout
    b.device(ROOT_INO, "sda", NodeKind.BLOCK, 8, 1)
    opq = b.dir(ROOT_INO, "opq")
    opq.xattrs["trusted.overlay.opaque"] = b"y"
    many = b.dir(ROOT_INO, "many")
    for i in range(BIG):
        b.file(many.ino, f"f{i:05d}", b"")
    return b.build()


class Notifications:
    """A ``KernelNotifier`` that records what it is asked to invalidate."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int] | tuple[str, int, bytes]] = []

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.calls.append(("entry", parent, name))

    def invalidate_inode(self, ino: int) -> None:
        self.calls.append(("inode", ino))


def sample_mounted(tmp_path: Path, layer_id: int) -> tuple[MountedLayer, FakeFetcher]:
    index, blob = sample_layer()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path / f"c{layer_id}", 1 << 24))
    return MountedLayer(layer_id, fetcher.digest, index, reader), fetcher


def make_ops(tmp_path: Path, shared: bool = False, layer_id: int = 1
             ) -> tuple[LayerOperations, FakeFetcher]:
    ops = LayerOperations(shared=shared, timeouts=FuseTimeouts(600, 700))
    layer, fetcher = sample_mounted(tmp_path, layer_id)
    ops.add_layer(layer)
    return ops, fetcher


def fuse_errno(call: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(FuseError) as info:
        call(*args)
    return info.value.errno


async def async_errno(call: Awaitable[Any]) -> int:
    with pytest.raises(FuseError) as info:
        await call
    return info.value.errno


def path_ino(ops: LayerOperations, *names: str, root: int = ROOT_INO) -> int:
    ino = root
    for name in names:
        ino = ops.lookup(ino, name.encode()).st_ino
    return ino


def list_all(ops: LayerOperations, ino: int, room: int = 100) -> list[tuple[bytes, int, int]]:
    """A whole listing the way the session reads it: ``room`` entries per READDIR, each
    one starting at the offset the previous one's last entry gave."""
    out: list[tuple[bytes, int, int]] = []
    offset = 0
    while True:
        batch = []
        for name, attr, next_off in ops.readdir(ino, offset):
            batch.append((name, attr.st_ino, next_off))
            if len(batch) == room:
                break
        if not batch:
            return out
        out += batch
        offset = batch[-1][2]


def test_attributes_are_exactly_the_index(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)
    etc = ops.lookup(ROOT_INO, b"etc")
    assert (stat.S_IFMT(etc.st_mode), stat.S_IMODE(etc.st_mode)) == (stat.S_IFDIR, 0o750)
    assert (etc.st_uid, etc.st_gid, etc.st_mtime_ns, etc.st_nlink) == (5, 6, MTIME, 2)
    assert (etc.st_atime_ns, etc.st_ctime_ns) == (MTIME, MTIME)
    assert (etc.entry_timeout, etc.attr_timeout) == (600, 700)
    hosts = ops.lookup(etc.st_ino, b"hosts")
    assert hosts.st_mode == stat.S_IFREG | 0o640
    assert (hosts.st_size, hosts.st_uid, hosts.st_gid, hosts.st_blocks) == (20, 7, 8, 1)
    big = ops.getattr(path_ino(ops, "big"))
    assert big.st_nlink == 2 and big.st_size == 25600 and big.st_blocks == 50
    assert ops.lookup(etc.st_ino, b"big-link").st_ino == big.st_ino
    gone = ops.lookup(ROOT_INO, b"gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    sda = ops.lookup(ROOT_INO, b"sda")
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 1)
    link = ops.lookup(ROOT_INO, b"link")
    assert stat.S_ISLNK(link.st_mode) and link.st_size == 9
    assert ops.readlink(link.st_ino) == b"etc/hosts"
    assert fuse_errno(ops.readlink, etc.st_ino) == errno.EINVAL
    assert ops.lookup(etc.st_ino, b"..").st_ino == ROOT_INO
    assert ops.lookup(etc.st_ino, b".").st_ino == etc.st_ino
    assert ops.lookup(ROOT_INO, b"..").st_ino == ROOT_INO


def test_missing_names_and_inodes_are_enoent(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)
    assert fuse_errno(ops.lookup, ROOT_INO, b"nope") == errno.ENOENT
    assert fuse_errno(ops.getattr, 987_654) == errno.ENOENT
    assert fuse_errno(ops.readlink, 987_654) == errno.ENOENT
    assert fuse_errno(ops.listxattr, 987_654) == errno.ENOENT
    assert fuse_errno(ops.access, 987_654, os.R_OK) == errno.ENOENT
    assert fuse_errno(ops.readdir, 987_654, 0) == errno.ENOENT
    hosts = path_ino(ops, "etc", "hosts")
    assert fuse_errno(ops.lookup, hosts, b"x") == errno.ENOTDIR
    assert ops.getattr(hosts).st_size == 20  # static inodes: asking again is fine


def test_xattrs(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)
    opq = path_ino(ops, "opq")
    assert ops.getxattr(opq, b"trusted.overlay.opaque") == b"y"
    assert list(ops.listxattr(opq)) == [b"trusted.overlay.opaque"]
    assert fuse_errno(ops.getxattr, opq, b"user.x") == ENOATTR == errno.ENODATA
    assert list(ops.listxattr(ROOT_INO)) == []


def test_large_directory_listing_with_offsets(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)
    many = path_ino(ops, "many")
    entries = list_all(ops, many)
    assert [name for name, _, _ in entries] == [f"f{i:05d}".encode() for i in range(BIG)]
    assert len({ino for _, ino, _ in entries}) == BIG
    assert [off for _, _, off in entries] == list(range(1, BIG + 1))
    for _, ino, _ in entries[:3]:
        assert stat.S_ISREG(ops.getattr(ino).st_mode)
    assert list_all(ops, many, room=7) == entries  # another buffer size, same listing
    # resuming anywhere gives the rest; at or past the end, nothing
    tail = [(n, attr.st_ino, off) for n, attr, off in ops.readdir(many, BIG - 3)]
    assert tail == entries[-3:]
    assert list(ops.readdir(many, BIG)) == [] and list(ops.readdir(many, BIG + 10)) == []
    root = [name for name, _, _ in list_all(ops, ROOT_INO)]
    assert root == [b"etc", b"big", b"link", b"gone", b"sda", b"opq", b"many"]  # index order
    assert b"." not in root and b".." not in root
    assert fuse_errno(ops.readdir, path_ino(ops, "big"), 0) == errno.ENOTDIR


async def test_reads_at_any_offset(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)
    data = bytes(range(256)) * 100
    ino = path_ino(ops, "big")
    for off, size in ((0, 4096), (999, 2), (25_000, 4096), (25_600, 10), (1, 25_599)):
        assert await ops.read(ino, off, size) == data[off : off + size]
    assert await ops.read(path_ino(ops, "etc", "hosts"), 10, 100) == b"localhost\n"
    assert await async_errno(ops.read(path_ino(ops, "etc"), 0, 10)) == errno.EISDIR
    assert await async_errno(ops.read(path_ino(ops, "link"), 0, 10)) == errno.EINVAL
    assert await async_errno(ops.read(987_654, 0, 10)) == errno.ENOENT


async def test_a_read_that_waits_is_logged_with_its_path_at_debug_level(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ops, _ = make_ops(tmp_path)
    ino = path_ino(ops, "etc", "hosts")
    with caplog.at_level(logging.INFO, logger="snapshotter.fs.ops"):
        await ops.read(ino, 0, 10)
    assert not caplog.records  # nothing at info level
    with caplog.at_level(logging.DEBUG, logger="snapshotter.fs.ops"):
        assert await ops.read(path_ino(ops, "big"), 0, 10) == bytes(range(10))
    [record] = caplog.records
    assert "read of /big [0, +10) waited" in record.getMessage()


def test_access_checks_existence_and_refuses_writing(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)
    ino = path_ino(ops, "big")
    assert fuse_errno(ops.access, ino, os.W_OK) == errno.EROFS
    assert fuse_errno(ops.access, ROOT_INO, os.R_OK | os.W_OK) == errno.EROFS
    assert ops.access(ino, os.R_OK | os.X_OK) is None
    assert ops.access(ino, os.F_OK) is None


async def test_registry_and_digest_failures_are_eio(tmp_path: Path) -> None:
    ops, fetcher = make_ops(tmp_path)
    ino = path_ino(ops, "big")
    fetcher.fail = RegistryTimeout("deadline passed")
    assert await async_errno(ops.read(ino, 0, 100)) == errno.EIO
    fetcher.fail = None
    fetcher.blob = b"\0" * len(fetcher.blob)
    assert await async_errno(ops.read(ino, 0, 100)) == errno.EIO  # DigestMismatch


def test_statfs(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)
    s = ops.statfs()
    assert s.bsize == 4096 and s.namelen == 255
    assert s.blocks == (25_600 + 20 + 4095) // 4096
    assert s.files > BIG
    assert LayerOperations(shared=True).statfs().blocks == 0


async def test_dedicated_root_before_the_layer_is_added(tmp_path: Path) -> None:
    notes = Notifications()
    ops = LayerOperations(shared=False, notifier=notes)
    root = ops.getattr(ROOT_INO)
    assert stat.S_ISDIR(root.st_mode) and root.attr_timeout == 0 and root.entry_timeout == 0
    assert fuse_errno(ops.lookup, ROOT_INO, b"etc") == errno.ENOENT
    assert list(ops.readdir(ROOT_INO, 0)) == []  # the placeholder is empty
    assert await async_errno(ops.read(ROOT_INO, 0, 1)) == errno.EISDIR
    layer, fetcher = sample_mounted(tmp_path, 7)
    ops.add_layer(layer)
    assert notes.calls == [("inode", ROOT_INO)]  # the kernel forgets the empty root
    assert ops.getattr(ROOT_INO).attr_timeout == 3600
    assert ops.lookup(ROOT_INO, b"etc").st_ino == layer.index.root.children["etc"]
    assert [n for n, _, _ in list_all(ops, ROOT_INO)][:2] == [b"etc", b"big"]
    with pytest.raises(FailedPrecondition):
        ops.add_layer(MountedLayer(8, fetcher.digest, layer.index, layer.reader))
    assert notes.calls == [("inode", ROOT_INO)]  # a refused add notifies nothing
    assert ops.remove_layer(7) is layer
    assert notes.calls == [("inode", ROOT_INO)] * 2  # dedicated: no entry to invalidate
    assert ops.getattr(ROOT_INO).attr_timeout == 0  # the placeholder again
    assert list(ops.readdir(ROOT_INO, 0)) == []


async def test_shared_layout(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path, shared=True, layer_id=3)
    notes = Notifications()
    ops.notifier = notes
    layer12, _ = sample_mounted(tmp_path, 12)
    ops.add_layer(layer12)
    assert notes.calls == [("inode", ROOT_INO)]
    listing = list_all(ops, ROOT_INO)
    assert [(n, i) for n, i, _ in listing] == [(b"3", (3 << 32) | 1), (b"12", (12 << 32) | 1)]
    root = ops.getattr(ROOT_INO)
    assert root.attr_timeout == 0 and root.st_nlink == 4
    hosts = path_ino(ops, "12", "etc", "hosts")
    assert hosts == (12 << 32) | layer12.index.root.children["etc"] + 1
    ino = path_ino(ops, "3", "big")
    assert ino >> 32 == 3 and await ops.read(ino, 0, 3) == b"\0\1\2"
    assert ops.lookup((3 << 32) | 1, b"..").st_ino == ROOT_INO
    assert ops.lookup((3 << 32) | 1, b"etc").entry_timeout == 600
    assert ops.lookup(ROOT_INO, b"3").entry_timeout == 600  # a layer's root is cacheable
    for name in (b"03", b"4", b"x", b"99999999999", b""):
        assert fuse_errno(ops.lookup, ROOT_INO, name) == errno.ENOENT
    assert fuse_errno(ops.getattr, 4 << 32 | 1) == errno.ENOENT  # no layer 4

    assert ops.remove_layer(3).layer_id == 3
    assert notes.calls[1:] == [("entry", ROOT_INO, b"3"), ("inode", ROOT_INO)]
    assert fuse_errno(ops.getattr, ino) == errno.ENOENT
    assert await async_errno(ops.read(ino, 0, 3)) == errno.ENOENT
    assert fuse_errno(ops.lookup, ROOT_INO, b"3") == errno.ENOENT
    assert [n for n, _, _ in list_all(ops, ROOT_INO)] == [b"12"]
    assert ops.getattr(ROOT_INO).st_nlink == 3
    with pytest.raises(NotFound):
        ops.remove_layer(3)
    with pytest.raises(AlreadyExists):
        ops.add_layer(MountedLayer(12, "d", layer12.index, layer12.reader))
    for bad in (0, -1, 1 << 31):
        with pytest.raises(InvalidArgument):
            ops.add_layer(MountedLayer(bad, "d", layer12.index, layer12.reader))
    assert len(notes.calls) == 3  # refused changes notify nothing
    assert set(ops.layers) == {12}


def test_a_removed_layers_directories_are_gone_from_the_listing_cache(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path, shared=True, layer_id=3)
    many = path_ino(ops, "3", "many")
    layer_root = path_ino(ops, "3")
    assert len(list_all(ops, many)) == BIG  # listed: kept between READDIR calls
    assert len(list_all(ops, layer_root)) == 7
    ops.remove_layer(3)
    assert fuse_errno(ops.readdir, many, 0) == errno.ENOENT
    assert fuse_errno(ops.readdir, many, 100) == errno.ENOENT
    assert fuse_errno(ops.readdir, layer_root, 0) == errno.ENOENT
    assert list(ops.readdir(ROOT_INO, 0)) == []
    # the same id added again serves the new layer, not what was listed before
    b = LayerBuilder()
    b.dir(ROOT_INO, "only")
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    ops.add_layer(MountedLayer(3, fetcher.digest, index, ChunkReader(
        {"": fetcher}, ChunkCache(tmp_path / "again", 1 << 20))))
    assert [n for n, _, _ in list_all(ops, layer_root)] == [b"only"]


def test_shared_inode_numbers_are_stable_across_instances(tmp_path: Path) -> None:
    first, _ = make_ops(tmp_path, shared=True, layer_id=9)
    second, _ = make_ops(tmp_path / "again", shared=True, layer_id=9)
    for names in (("9",), ("9", "etc", "hosts"), ("9", "many", "f04999")):
        assert path_ino(first, *names) == path_ino(second, *names)
    assert path_ino(first, "9", "many", "f04999") >> 32 == 9


def bare_layer(tmp_path: Path) -> MountedLayer:
    """A layer without a single xattr."""
    b = LayerBuilder()
    d = b.dir(ROOT_INO, "d")
    b.file(d.ino, "f", b"data")
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path / "bare", 1 << 20))
    return MountedLayer(1, fetcher.digest, index, reader)


def test_dedicated_layer_without_xattrs_answers_enosys(tmp_path: Path) -> None:
    ops = LayerOperations(shared=False)
    # the placeholder root before the layer is mounted: an ordinary "no such attribute"
    assert fuse_errno(ops.getxattr, ROOT_INO, b"user.x") == ENOATTR
    assert list(ops.listxattr(ROOT_INO)) == []
    layer = bare_layer(tmp_path)
    assert not layer.has_xattrs
    ops.add_layer(layer)
    f = path_ino(ops, "d", "f")
    for ino in (ROOT_INO, f):  # ENOSYS: the kernel stops asking for this mount
        assert fuse_errno(ops.getxattr, ino, b"trusted.overlay.opaque") == errno.ENOSYS
        assert list(ops.listxattr(ino)) == []  # listings still answer
    assert fuse_errno(ops.getxattr, 987_654, b"user.x") == errno.ENOENT


def test_layers_with_xattrs_and_shared_mounts_never_answer_enosys(tmp_path: Path) -> None:
    ops, _ = make_ops(tmp_path)  # the sample layer has an opaque directory
    assert fuse_errno(ops.getxattr, ROOT_INO, b"user.x") == ENOATTR
    shared = LayerOperations(shared=True)
    shared.add_layer(bare_layer(tmp_path))
    root = path_ino(shared, "1")
    assert fuse_errno(shared.getxattr, root, b"user.x") == ENOATTR
    assert list(shared.listxattr(root)) == []
    assert list(shared.listxattr(ROOT_INO)) == []
    assert fuse_errno(shared.getxattr, ROOT_INO, b"user.x") == ENOATTR


def test_unexpected_exceptions_become_eio(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ops, _ = make_ops(tmp_path)
    etc = path_ino(ops, "etc")

    class Boom(Exception):
        pass

    def boom(*_: object) -> None:
        raise Boom("bug")

    monkeypatch.setattr(ops, "_resolve", boom)
    assert fuse_errno(ops.getattr, etc) == errno.EIO
    assert "getattr failed" in caplog.text


async def test_read_plan_answers_only_for_cached_bytes_of_regular_files(tmp_path: Path
                                                                       ) -> None:
    ops, fetcher = make_ops(tmp_path)
    data = bytes(range(256)) * 100
    ino = path_ino(ops, "big")
    assert ops.read_plan(ino, 0, 4096) is None  # nothing cached yet: ``read`` must fetch
    for other in (ROOT_INO, path_ino(ops, "etc"), path_ino(ops, "link"), 987_654):
        assert ops.read_plan(other, 0, 10) is None
        assert ops.passthrough_file(other) is None
    assert await ops.read(ino, 0, len(data)) == data
    plan = None
    for _ in range(500):  # the chunks are stored (and read-ahead is done) in a moment
        plan = ops.read_plan(ino, 1000, 2000)
        if plan is not None:
            break
        await asyncio.sleep(0.01)
    fetched = len(fetcher.calls)
    assert plan is not None and plan.size == 2000
    buf = memoryview(bytearray(plan.size))
    assert plan.fill(buf) and bytes(buf) == data[1000:3000]
    assert len(fetcher.calls) == fetched  # served from the cache, nothing fetched
    shared, _ = make_ops(tmp_path / "s", shared=True, layer_id=5)
    assert shared.read_plan(ROOT_INO, 0, 1) is None
    assert shared.passthrough_file(ROOT_INO) is None
