"""The FUSE request handlers, called directly (no mount): attributes, directories, reads,
xattrs, errno mapping, and the dedicated and shared layouts."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import pyfuse3
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
from snapshotter.fs.ops import FuseTimeouts, LayerOperations, MountedLayer
from snapshotter.fs.reader import ChunkReader
from tests.unit.test_fs_fakes import FakeFetcher, LayerBuilder

CTX = cast(pyfuse3.RequestContext, None)
MTIME = 1_700_000_000_123_456_789
BIG = 5003


class Replies:
    """A fake ``readdir_reply`` that accepts ``room`` entries per readdir call."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.left = room
        self.entries: list[tuple[bytes, int, int]] = []

    def __call__(self, token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
                 ) -> bool:
        if self.left == 0:
            return False
        self.left -= 1
        self.entries.append((name, attr.st_ino, next_id))
        return True

    async def list_all(self, ops: LayerOperations, fh: int) -> list[tuple[bytes, int, int]]:
        start = 0
        while True:
            self.left = self.room
            before = len(self.entries)
            await ops.readdir(fh, start, cast(pyfuse3.ReaddirToken, None))
            if len(self.entries) == before:
                return self.entries
            start = self.entries[-1][2]


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


def make_ops(tmp_path: Path, shared: bool = False, layer_id: int = 1
             ) -> tuple[LayerOperations, FakeFetcher, Replies]:
    index, blob = sample_layer()
    replies = Replies(100)
    ops = LayerOperations(shared=shared, timeouts=FuseTimeouts(600, 700), readdir_reply=replies)
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path / f"c{layer_id}", 1 << 24))
    ops.add_layer(MountedLayer(layer_id, fetcher.digest, index, reader))
    return ops, fetcher, replies


async def fuse_errno(call: Awaitable[Any]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


async def path_ino(ops: LayerOperations, *names: str, root: int = ROOT_INO) -> int:
    ino = root
    for name in names:
        ino = (await ops.lookup(ino, name.encode(), CTX)).st_ino
    return ino


async def test_attributes_are_exactly_the_index(tmp_path: Path) -> None:
    ops, _, _ = make_ops(tmp_path)
    etc = await ops.lookup(ROOT_INO, b"etc", CTX)
    assert (stat.S_IFMT(etc.st_mode), stat.S_IMODE(etc.st_mode)) == (stat.S_IFDIR, 0o750)
    assert (etc.st_uid, etc.st_gid, etc.st_mtime_ns, etc.st_nlink) == (5, 6, MTIME, 2)
    assert (etc.entry_timeout, etc.attr_timeout) == (600, 700)
    hosts = await ops.lookup(etc.st_ino, b"hosts", CTX)
    assert hosts.st_mode == stat.S_IFREG | 0o640
    assert (hosts.st_size, hosts.st_uid, hosts.st_gid, hosts.st_blocks) == (20, 7, 8, 1)
    big = await ops.getattr(await path_ino(ops, "big"), CTX)
    assert big.st_nlink == 2 and big.st_size == 25600 and big.st_blocks == 50
    assert (await ops.lookup(etc.st_ino, b"big-link", CTX)).st_ino == big.st_ino
    gone = await ops.lookup(ROOT_INO, b"gone", CTX)
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    sda = await ops.lookup(ROOT_INO, b"sda", CTX)
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 1)
    link = await ops.lookup(ROOT_INO, b"link", CTX)
    assert stat.S_ISLNK(link.st_mode) and link.st_size == 9
    assert await ops.readlink(link.st_ino, CTX) == b"etc/hosts"
    assert await fuse_errno(ops.readlink(etc.st_ino, CTX)) == errno.EINVAL
    assert (await ops.lookup(etc.st_ino, b"..", CTX)).st_ino == ROOT_INO
    assert (await ops.lookup(etc.st_ino, b".", CTX)).st_ino == etc.st_ino


async def test_missing_names_and_inodes_are_enoent(tmp_path: Path) -> None:
    ops, _, _ = make_ops(tmp_path)
    assert await fuse_errno(ops.lookup(ROOT_INO, b"nope", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.getattr(987_654, CTX)) == errno.ENOENT
    hosts = await path_ino(ops, "etc", "hosts")
    assert await fuse_errno(ops.lookup(hosts, b"x", CTX)) == errno.ENOTDIR
    await ops.forget([(hosts, 1)])  # static inodes: still there
    assert (await ops.getattr(hosts, CTX)).st_size == 20


async def test_xattrs(tmp_path: Path) -> None:
    ops, _, _ = make_ops(tmp_path)
    opq = await path_ino(ops, "opq")
    assert await ops.getxattr(opq, b"trusted.overlay.opaque", CTX) == b"y"
    assert await ops.listxattr(opq, CTX) == [b"trusted.overlay.opaque"]
    assert await fuse_errno(ops.getxattr(opq, b"user.x", CTX)) == pyfuse3.ENOATTR
    assert await ops.listxattr(ROOT_INO, CTX) == []


async def test_large_directory_listing_with_offsets(tmp_path: Path) -> None:
    ops, _, replies = make_ops(tmp_path)
    fh = await ops.opendir(await path_ino(ops, "many"), CTX)
    entries = await replies.list_all(ops, fh)
    await ops.releasedir(fh)
    assert [name for name, _, _ in entries] == [f"f{i:05d}".encode() for i in range(BIG)]
    assert len({ino for _, ino, _ in entries}) == BIG
    assert await fuse_errno(ops.readdir(fh, 0, cast(pyfuse3.ReaddirToken, None))) == errno.EBADF


async def test_reads_at_any_offset(tmp_path: Path) -> None:
    ops, _, _ = make_ops(tmp_path)
    data = bytes(range(256)) * 100
    ino = await path_ino(ops, "big")
    info = await ops.open(ino, os.O_RDONLY, CTX)
    assert info.keep_cache
    for off, size in ((0, 4096), (999, 2), (25_000, 4096), (25_600, 10), (1, 25_599)):
        assert await ops.read(info.fh, off, size) == data[off : off + size]
    await ops.release(info.fh)


async def test_writes_are_erofs(tmp_path: Path) -> None:
    ops, _, _ = make_ops(tmp_path)
    ino = await path_ino(ops, "big")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert await fuse_errno(ops.open(ino, flags, CTX)) == errno.EROFS
    assert await fuse_errno(ops.write(ino, 0, b"x")) == errno.EROFS
    assert await fuse_errno(ops.mkdir(ROOT_INO, b"d", 0o755, CTX)) == errno.EROFS
    assert await fuse_errno(ops.unlink(ROOT_INO, b"big", CTX)) == errno.EROFS
    assert await fuse_errno(ops.create(ROOT_INO, b"n", 0o644, os.O_WRONLY, CTX)) == errno.EROFS
    assert await fuse_errno(ops.setxattr(ino, b"user.a", b"1", CTX)) == errno.EROFS
    assert await fuse_errno(ops.access(ino, os.W_OK, CTX)) == errno.EROFS
    assert await ops.access(ino, os.R_OK | os.X_OK, CTX)


async def test_registry_and_digest_failures_are_eio(tmp_path: Path) -> None:
    ops, fetcher, _ = make_ops(tmp_path)
    ino = await path_ino(ops, "big")
    fetcher.fail = RegistryTimeout("deadline passed")
    assert await fuse_errno(ops.read(ino, 0, 100)) == errno.EIO
    fetcher.fail = None
    fetcher.blob = b"\0" * len(fetcher.blob)
    assert await fuse_errno(ops.read(ino, 0, 100)) == errno.EIO  # DigestMismatch


async def test_statfs(tmp_path: Path) -> None:
    ops, _, _ = make_ops(tmp_path)
    s = await ops.statfs(CTX)
    assert s.f_bsize == 4096 and s.f_namemax == 255 and s.f_bfree == 0 and s.f_bavail == 0
    assert s.f_blocks == (25_600 + 20 + 4095) // 4096
    assert s.f_files > BIG


async def test_dedicated_root_before_the_layer_is_added(tmp_path: Path) -> None:
    ops = LayerOperations(shared=False)
    root = await ops.getattr(ROOT_INO, CTX)
    assert stat.S_ISDIR(root.st_mode) and root.attr_timeout == 0
    assert await fuse_errno(ops.lookup(ROOT_INO, b"etc", CTX)) == errno.ENOENT
    index, blob = sample_layer()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path, 1 << 20))
    ops.add_layer(MountedLayer(7, fetcher.digest, index, reader))
    assert (await ops.getattr(ROOT_INO, CTX)).attr_timeout == 3600
    assert (await ops.lookup(ROOT_INO, b"etc", CTX)).st_ino == index.root.children["etc"]
    with pytest.raises(FailedPrecondition):
        ops.add_layer(MountedLayer(8, fetcher.digest, index, reader))


class Notes:
    def __init__(self) -> None:
        self.removed: list[tuple[int, bytes]] = []

    def entry_removed(self, parent_ino: int, name: bytes) -> None:
        self.removed.append((parent_ino, name))


async def test_shared_layout(tmp_path: Path) -> None:
    ops, _, replies = make_ops(tmp_path, shared=True, layer_id=3)
    notes = Notes()
    ops._notifier = notes
    index, blob = sample_layer()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path / "c", 1 << 24))
    ops.add_layer(MountedLayer(12, fetcher.digest, index, reader))
    fh = await ops.opendir(ROOT_INO, CTX)
    listing = await replies.list_all(ops, fh)
    assert [(n, i) for n, i, _ in listing] == [(b"3", (3 << 32) | 1), (b"12", (12 << 32) | 1)]
    hosts = await path_ino(ops, "12", "etc", "hosts")
    assert hosts == (12 << 32) | index.root.children["etc"] + 1
    ino = await path_ino(ops, "3", "big")
    assert ino >> 32 == 3 and await ops.read(ino, 0, 3) == b"\0\1\2"
    assert (await ops.lookup((3 << 32) | 1, b"..", CTX)).st_ino == ROOT_INO
    assert await fuse_errno(ops.lookup(ROOT_INO, b"03", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ROOT_INO, b"4", CTX)) == errno.ENOENT
    assert (await ops.getattr(ROOT_INO, CTX)).st_nlink == 4
    ops.remove_layer(3)
    assert notes.removed == [(ROOT_INO, b"3")]
    assert await fuse_errno(ops.getattr(ino, CTX)) == errno.ENOENT
    assert await fuse_errno(ops.read(ino, 0, 3)) == errno.EBADF
    assert await fuse_errno(ops.lookup(ROOT_INO, b"3", CTX)) == errno.ENOENT
    with pytest.raises(NotFound):
        ops.remove_layer(3)
    with pytest.raises(AlreadyExists):
        ops.add_layer(MountedLayer(12, fetcher.digest, index, reader))
    for bad in (0, 1 << 31):
        with pytest.raises(InvalidArgument):
            ops.add_layer(MountedLayer(bad, fetcher.digest, index, reader))


async def test_shared_inode_numbers_are_stable_across_instances(tmp_path: Path) -> None:
    first, _, _ = make_ops(tmp_path, shared=True, layer_id=9)
    second, _, _ = make_ops(tmp_path / "again", shared=True, layer_id=9)
    for names in (("9",), ("9", "etc", "hosts"), ("9", "many", "f04999")):
        assert await path_ino(first, *names) == await path_ino(second, *names)


def bare_layer(tmp_path: Path) -> MountedLayer:
    """A layer without a single xattr."""
    b = LayerBuilder()
    d = b.dir(ROOT_INO, "d")
    b.file(d.ino, "f", b"data")
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path / "bare", 1 << 20))
    return MountedLayer(1, fetcher.digest, index, reader)


async def test_dedicated_layer_without_xattrs_answers_enosys(tmp_path: Path) -> None:
    ops = LayerOperations(shared=False)
    # the placeholder root before the layer is mounted: an ordinary "no such attribute"
    assert await fuse_errno(ops.getxattr(ROOT_INO, b"user.x", CTX)) == pyfuse3.ENOATTR
    assert await ops.listxattr(ROOT_INO, CTX) == []
    layer = bare_layer(tmp_path)
    assert not layer.has_xattrs
    ops.add_layer(layer)
    f = await path_ino(ops, "d", "f")
    for ino in (ROOT_INO, f):  # ENOSYS: the kernel stops asking for this mount
        assert await fuse_errno(ops.getxattr(ino, b"trusted.overlay.opaque", CTX)) == errno.ENOSYS
        assert await ops.listxattr(ino, CTX) == []  # listings still answer
    assert await fuse_errno(ops.getxattr(987_654, b"user.x", CTX)) == errno.ENOENT


async def test_layers_with_xattrs_and_shared_mounts_never_answer_enosys(tmp_path: Path) -> None:
    ops, _, _ = make_ops(tmp_path)  # the sample layer has an opaque directory
    assert await fuse_errno(ops.getxattr(ROOT_INO, b"user.x", CTX)) == pyfuse3.ENOATTR
    shared = LayerOperations(shared=True)
    shared.add_layer(bare_layer(tmp_path))
    root = await path_ino(shared, "1")
    assert await fuse_errno(shared.getxattr(root, b"user.x", CTX)) == pyfuse3.ENOATTR
    assert await shared.listxattr(root, CTX) == []
    assert await shared.listxattr(ROOT_INO, CTX) == []


def test_init_runs_the_on_init_hook() -> None:
    calls: list[str] = []
    LayerOperations(shared=False, on_init=lambda: calls.append("init")).init()
    LayerOperations(shared=False).init()  # no hook: nothing to do
    assert calls == ["init"]
