"""The FUSE session for real: a ``FuseSession`` over ``LayerOperations`` mounted with
mount(2) and served on the test's own event loop, looked at through the kernel.

The file-system calls on the mount block until the session answers, and the session
answers on this loop: every such call runs in a thread (``asyncio.to_thread``), and the
loop thread itself never touches the mount (mounts are found in /proc/self/mountinfo).

Needs root and /dev/fuse; fails (never skips) without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import os
import random
import re
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from snapshotter.cache.chunkcache import ChunkCache
from snapshotter.formats.index import ROOT_INO, NodeKind
from snapshotter.fs.fuse import wire as w
from snapshotter.fs.fuse.session import FuseSession, MountOptions
from snapshotter.fs.ops import FuseTimeouts, LayerOperations, MountedLayer, NullNotifier
from snapshotter.fs.read.reader import ChunkReader
from snapshotter.metrics.counters import FuseStats
from tests.unit.test_fs_fakes import FakeFetcher, LayerBuilder

T = TypeVar("T")

MTIME = 1_600_000_000_123_456_789
MANY = 5000
BIG = random.Random(4321).randbytes(3 * (1 << 20) + 12345)
HOSTS = b"127.0.0.1 localhost\n::1 localhost\n"
BIG_MINOR = 0x12345  # above 255: encoded in the high bits of fuse_attr.rdev


def require_fuse() -> None:
    if os.geteuid() != 0:
        pytest.fail("the FUSE session tests need root (mount(2) of a FUSE file system)")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("the FUSE session tests need /dev/fuse (load the fuse module)")


def build(tmp_path: Path, layer_id: int, extra: str = "") -> tuple[MountedLayer, FakeFetcher]:
    """A layer with every kind of node, a big multi-chunk file, a directory of MANY
    entries and 5 directories of 4 small files each; ``extra`` names one more file."""
    b = LayerBuilder()
    etc = b.dir(ROOT_INO, "etc", mode=0o750, uid=5, gid=6, mtime_ns=MTIME)
    hosts = b.file(etc.ino, "hosts", HOSTS, mode=0o640, uid=1000, gid=1001, mtime_ns=MTIME)
    hosts.xattrs["user.origin"] = b"test"
    big = b.file(ROOT_INO, "big.bin", BIG, chunk_size=1 << 18, mode=0o755)
    b.hardlink(etc.ino, "big-link", big)
    b.symlink(ROOT_INO, "link", b"etc/hosts")
    b.device(ROOT_INO, "removed", NodeKind.CHAR, 0, 0)  # a whiteout
    b.device(ROOT_INO, "sda1", NodeKind.BLOCK, 8, 1)
    b.device(ROOT_INO, "tty", NodeKind.CHAR, 8, 1)
    b.device(ROOT_INO, "wide", NodeKind.CHAR, 259, BIG_MINOR)
    opq = b.dir(ROOT_INO, "opq")
    opq.xattrs["trusted.overlay.opaque"] = b"y"
    b.file(opq.ino, "kept", b"kept")
    for d in range(5):
        sub = b.dir(ROOT_INO, f"d{d}")
        for f in range(4):
            b.file(sub.ino, f"f{f}", b"file %d/%d\n" % (d, f))
    many = b.dir(ROOT_INO, "many")
    for i in range(MANY):
        b.file(many.ino, f"f{i:05d}", b"%d" % i)
    if extra:
        b.file(ROOT_INO, extra, b"extra")
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path / f"cache-{layer_id}", 1 << 26))
    return MountedLayer(layer_id, fetcher.digest, index, reader), fetcher


def build_layer(tmp_path: Path, layer_id: int, extra: str = "") -> MountedLayer:
    return build(tmp_path, layer_id, extra)[0]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_at(path: Path) -> list[str]:
    """File-system types mounted at ``path``, from /proc/self/mountinfo (which, unlike a
    stat of the mount point, never sends the session a request)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == str(path):
                out.append(fields[fields.index("-") + 1])
    return out


@dataclass
class Served:
    ops: LayerOperations
    session: FuseSession
    stats: FuseStats
    mnt: Path
    task: asyncio.Task[None]

    def count(self, *ops: str) -> int:
        return sum(self.stats.ops.get(op, 0) for op in ops)


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a thread, bounded so that a hang fails the test."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 60)


async def notifications_written() -> None:
    """Wait for the session's notification threads (each writes one message)."""
    def join() -> None:
        for t in threading.enumerate():
            if t.name == "fuse-notify":
                t.join(30)

    await off_loop(join)


def detach(path: Path) -> None:
    """``umount -l`` without a child process: a forked child would close (and FLUSH)
    the files that threads of this process hold open on the mount, and wait for an
    answer that only this process's loop, itself waiting for the child, can give."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(os.fsencode(path), 2)  # MNT_DETACH


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, *, shared: bool, layers: Sequence[MountedLayer] = (),
                  passthrough: bool = True, spin_s: float = 0.0) -> AsyncIterator[Served]:
    require_fuse()
    mnt = Path(os.path.realpath(tmp_path)) / "mnt"
    mnt.mkdir()
    stats = FuseStats()
    ops = LayerOperations(shared=shared, timeouts=FuseTimeouts(entry_s=60, attr_s=60))
    for layer in layers:
        ops.add_layer(layer)
    session = FuseSession(ops, str(mnt), MountOptions(fsname="lazysnap-test"), max_tasks=16,
                          stats=stats, passthrough=passthrough, spin_s=spin_s)
    ops.notifier = session
    session.mount()
    task = asyncio.create_task(session.serve())
    try:
        assert mounts_at(mnt) == ["fuse.lazysnap"]
        yield Served(ops, session, stats, mnt, task)
    finally:
        ops.notifier = NullNotifier()
        session.close()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            if mounts_at(mnt):
                detach(mnt)
            for layer in ops.layers.values():
                if isinstance(layer.reader, ChunkReader):
                    await layer.reader.aclose()


def errno_of(fn: Callable[..., object], *args: object) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno or 0


def check_files(root: Path) -> None:
    """Contents and attributes of the sample layer, as the kernel shows them."""
    assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == hashlib.sha256(
        BIG).digest()
    fd = os.open(root / "big.bin", os.O_RDONLY)
    try:
        for off, size in ((0, 1), (999_999, 70_000), (len(BIG) - 10, 100), (len(BIG), 10),
                          ((1 << 18) - 3, 6)):
            assert os.pread(fd, size, off) == BIG[off:off + size]
    finally:
        os.close(fd)
    assert (root / "etc/hosts").read_bytes() == HOSTS
    st = os.lstat(root / "etc/hosts")
    assert (st.st_mode, st.st_uid, st.st_gid) == (stat.S_IFREG | 0o640, 1000, 1001)
    assert (st.st_size, st.st_mtime_ns, st.st_nlink, st.st_blocks) == (len(HOSTS), MTIME, 1, 1)
    etc = os.lstat(root / "etc")
    assert (etc.st_mode, etc.st_uid, etc.st_gid) == (stat.S_IFDIR | 0o750, 5, 6)
    big = os.lstat(root / "big.bin")
    assert (big.st_mode, big.st_size, big.st_nlink) == (stat.S_IFREG | 0o755, len(BIG), 2)
    assert os.lstat(root / "etc/big-link").st_ino == big.st_ino
    assert os.readlink(root / "link") == "etc/hosts"
    assert os.lstat(root / "link").st_size == len("etc/hosts")
    assert (root / "link").read_bytes() == HOSTS
    for name, fmt, major, minor in (("removed", stat.S_IFCHR, 0, 0),
                                    ("sda1", stat.S_IFBLK, 8, 1), ("tty", stat.S_IFCHR, 8, 1),
                                    ("wide", stat.S_IFCHR, 259, BIG_MINOR)):
        dev = os.lstat(root / name)
        assert stat.S_IFMT(dev.st_mode) == fmt, name
        assert (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (major, minor), name
    assert os.getxattr(root / "opq", "trusted.overlay.opaque") == b"y"
    assert os.listxattr(root / "opq") == ["trusted.overlay.opaque"]
    assert os.getxattr(root / "etc/hosts", "user.origin") == b"test"
    assert errno_of(os.getxattr, root / "etc/hosts", "user.absent") == errno.ENODATA
    assert os.listdir(root / "opq") == ["kept"]
    assert errno_of(os.lstat, root / "absent") == errno.ENOENT
    assert errno_of(os.lstat, root / "etc/hosts/x") == errno.ENOTDIR
    fs = os.statvfs(root)
    assert (fs.f_namemax, fs.f_bfree, fs.f_bavail, fs.f_bsize) == (255, 0, 0, 4096)
    assert fs.f_blocks >= len(BIG) // 4096 and fs.f_files > MANY


async def test_files_and_attributes(tmp_path: Path) -> None:
    layer = build_layer(tmp_path, 1)
    async with serving(tmp_path, shared=False, layers=[layer]) as s:
        await off_loop(check_files, s.mnt)
        root = await off_loop(os.lstat, s.mnt)
        assert stat.S_ISDIR(root.st_mode) and root.st_ino == ROOT_INO
        hosts_ino = layer.index.nodes[layer.index.root.children["etc"]].children["hosts"]
        assert (await off_loop(os.lstat, s.mnt / "etc/hosts")).st_ino == hosts_ino
        # the session reported what it answered
        assert s.stats.served_bytes >= len(BIG) + len(HOSTS)
        assert s.count("read") > 0 and s.stats.errors.get("read", 0) == 0
        assert s.stats.errors["lookup"] >= 1  # "absent"
        assert s.stats.errors["getxattr"] >= 1  # "user.absent"
        assert s.count("lookup", "getattr", "statfs", "readlink") > 0
        assert all(h.count == s.stats.ops[op] for op, h in s.stats.latency.items())


async def test_reads_fail_with_eio_when_the_blob_cannot_be_fetched(tmp_path: Path) -> None:
    layer, fetcher = build(tmp_path, 1)
    async with serving(tmp_path, shared=False, layers=[layer]) as s:
        fetcher.blob = b"\0" * len(fetcher.blob)  # every chunk fails its digest
        assert await off_loop(errno_of, Path.read_bytes, s.mnt / "etc/hosts") == errno.EIO
        assert s.stats.errors["read"] >= 1
        assert await off_loop(os.listdir, s.mnt / "opq") == ["kept"]  # metadata still fine


def open_and_read(paths: list[Path]) -> list[bytes]:
    out = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            out.append(os.read(fd, 100))
        finally:
            os.close(fd)
    return out


def open_dirs(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        os.close(fd)
        assert os.listdir(p)


@pytest.mark.parametrize("passthrough", [False, True])
async def test_open_and_opendir_are_answered_once_then_never_sent(tmp_path: Path,
                                                                  passthrough: bool) -> None:
    """Without passthrough the session answers OPEN (and always OPENDIR) with ENOSYS: the
    kernel then opens by itself for the rest of the mount, keeping the page cache. With
    passthrough agreed, every OPEN is answered (a mode per open) but the page cache is
    kept all the same."""
    files = [f"d{d}/f{f}" for d in range(5) for f in range(4)]
    contents = [b"file %d/%d\n" % (d, f) for d in range(5) for f in range(4)]
    async with serving(tmp_path, shared=False, layers=[build_layer(tmp_path, 1)],
                       passthrough=passthrough) as s:
        paths = [s.mnt / f for f in files]
        assert await off_loop(open_and_read, paths) == contents
        await off_loop(open_dirs, [s.mnt / f"d{d}" for d in range(5)])
        await off_loop(open_dirs, [s.mnt, s.mnt / "etc", s.mnt / "opq"])
        assert s.count("opendir") <= 1 and s.count("releasedir") == 0
        if s.session.flags & w.PASSTHROUGH:
            assert passthrough and s.count("open") == len(files)
        else:
            assert s.count("open") <= 1
            # nothing was opened, so nothing is released (FLUSH: ENOSYS once, like OPEN)
            assert s.count("release") == 0 and s.count("flush") <= 1
        # the page cache is kept across opens: reading the files again sends no READ
        reads = s.count("read")
        assert await off_loop(open_and_read, paths) == contents
        assert s.count("read") == reads
        if not s.session.flags & w.PASSTHROUGH:
            assert s.count("open") <= 1
        # a big file read twice (the second time perhaps passed through to the cache)
        for _ in range(2):
            data = await off_loop((s.mnt / "big.bin").read_bytes)
            assert hashlib.sha256(data).digest() == hashlib.sha256(BIG).digest()
        assert s.stats.errors.get("open", 0) == 0 and s.stats.errors.get("read", 0) == 0


async def test_a_big_directory_is_listed_once_then_from_the_kernel_cache(tmp_path: Path
                                                                        ) -> None:
    async with serving(tmp_path, shared=False, layers=[build_layer(tmp_path, 1)]) as s:
        many = s.mnt / "many"
        names = await off_loop(os.listdir, many)
        assert sorted(names) == [f"f{i:05d}" for i in range(MANY)]
        assert len(names) == MANY
        listed = s.count("readdir", "readdirplus")
        assert listed > 1  # more than one kernel buffer's worth
        assert await off_loop(os.listdir, many) == names
        assert s.count("readdir", "readdirplus") == listed  # no request: the cached listing
        # READDIRPLUS brought the entries' attributes: no LOOKUP per entry of a walk
        lookups = s.count("lookup")
        sizes = await off_loop(lambda: [os.lstat(many / n).st_size for n in names[::50]])
        assert sizes == [len(b"%d" % int(n[1:])) for n in names[::50]]
        assert s.count("lookup") == lookups
        assert (await off_loop((many / "f04321").read_bytes)) == b"4321"


def check_writes_fail(root: Path) -> None:
    for path, flags in ((root / "etc/hosts", os.O_WRONLY), (root / "etc/hosts", os.O_RDWR),
                        (root / "etc/hosts", os.O_RDONLY | os.O_TRUNC),
                        (root / "new", os.O_WRONLY | os.O_CREAT)):
        assert errno_of(os.open, path, flags, 0o644) == errno.EROFS, (path, flags)
    assert errno_of(os.mkdir, root / "d") == errno.EROFS
    assert errno_of(os.unlink, root / "link") == errno.EROFS
    assert errno_of(os.rmdir, root / "opq") == errno.EROFS
    assert errno_of(os.rename, root / "link", root / "link2") == errno.EROFS
    assert errno_of(os.symlink, "x", root / "s") == errno.EROFS
    assert errno_of(os.link, root / "big.bin", root / "h") == errno.EROFS
    assert errno_of(os.chmod, root / "big.bin", 0o777) == errno.EROFS
    assert errno_of(os.truncate, root / "big.bin", 0) == errno.EROFS
    assert errno_of(os.setxattr, root / "opq", "user.x", b"1") == errno.EROFS
    assert errno_of(os.removexattr, root / "opq", "trusted.overlay.opaque") == errno.EROFS
    assert not os.access(root / "etc/hosts", os.W_OK)
    assert os.access(root / "etc/hosts", os.R_OK)
    assert (root / "etc/hosts").read_bytes() == HOSTS


async def test_a_polling_session_answers_bursts_and_sparse_requests_alike(tmp_path: Path
                                                                          ) -> None:
    """With ``spin_s`` the session polls for the next request before it sleeps: a burst
    (a stat and xattr walk), requests that come after it has gone back to sleep, reads
    that need a fetch meanwhile, and an outside unmount all work as without it."""
    async with serving(tmp_path, shared=True, layers=[build_layer(tmp_path, 1)],
                       spin_s=0.002) as s:
        root = s.mnt / "1"
        await off_loop(check_files, root)

        def walk() -> int:
            seen = 0
            for name in os.listdir(root / "many"):
                os.lstat(root / "many" / name)
                with contextlib.suppress(OSError):
                    os.getxattr(root / "many" / name, "user.absent")
                seen += 1
            return seen

        assert await off_loop(walk) == MANY
        for _ in range(3):  # one at a time, each after the session went back to sleep
            await asyncio.sleep(0.01)
            assert (await off_loop((root / "etc/hosts").read_bytes)) == HOSTS
        assert s.count("getxattr") >= MANY  # shared mode: every one is answered
        detach(s.mnt)
        await asyncio.wait_for(asyncio.shield(s.task), 10)


async def test_writes_fail_with_erofs(tmp_path: Path) -> None:
    async with serving(tmp_path, shared=False, layers=[build_layer(tmp_path, 1)]) as s:
        await off_loop(check_writes_fail, s.mnt)
        assert s.stats.errors.get("read", 0) == 0


async def test_shared_mode_layers_come_and_go(tmp_path: Path) -> None:
    async with serving(tmp_path, shared=True, layers=[build_layer(tmp_path, 3)]) as s:
        assert await off_loop(os.listdir, s.mnt) == ["3"]
        assert await off_loop((s.mnt / "3/etc/hosts").read_bytes) == HOSTS
        st = await off_loop(os.lstat, s.mnt / "3")
        assert st.st_ino == (3 << 32) | 1 and st.st_mode == stat.S_IFDIR | 0o755

        s.ops.add_layer(build_layer(tmp_path, 12, extra="only-in-12"))
        assert sorted(await off_loop(os.listdir, s.mnt)) == ["12", "3"]
        assert await off_loop((s.mnt / "12/only-in-12").read_bytes) == b"extra"
        assert (await off_loop(os.lstat, s.mnt / "12/etc")).st_ino >> 32 == 12
        assert (await off_loop(os.lstat, s.mnt)).st_nlink == 4
        assert sorted(await off_loop(os.listdir, s.mnt)) == ["12", "3"]

        # layer 3's entry, attributes and listing are all cached (60 s) by now
        removed = s.ops.remove_layer(3)
        await notifications_written()
        assert await off_loop(os.listdir, s.mnt) == ["12"]
        assert not await off_loop(os.path.lexists, s.mnt / "3")
        assert await off_loop(errno_of, os.lstat, s.mnt / "3/etc/hosts") == errno.ENOENT
        assert (await off_loop(os.lstat, s.mnt)).st_nlink == 3
        assert isinstance(removed.reader, ChunkReader)
        await removed.reader.aclose()

        # the same id again, another layer: nothing of the old one is shown
        s.ops.add_layer(build_layer(tmp_path, 3, extra="new-3"))
        await notifications_written()
        assert sorted(await off_loop(os.listdir, s.mnt)) == ["12", "3"]
        assert await off_loop((s.mnt / "3/new-3").read_bytes) == b"extra"


async def test_unmounting_from_outside_ends_serve(tmp_path: Path) -> None:
    async with serving(tmp_path, shared=True, layers=[build_layer(tmp_path, 3)]) as s:
        assert await off_loop(os.listdir, s.mnt) == ["3"]
        # forked from a thread: the loop stays free to answer whatever umount asks
        done = await off_loop(lambda: subprocess.run(["umount", "-l", str(s.mnt)]))
        assert done.returncode == 0
        await asyncio.wait_for(s.task, 10)  # returned, without an error
        assert mounts_at(s.mnt) == []
        s.session.close()  # after an external unmount: nothing left to undo, no error
        assert mounts_at(s.mnt) == []


async def test_close_leaves_nothing_mounted(tmp_path: Path) -> None:
    async with serving(tmp_path, shared=False, layers=[build_layer(tmp_path, 1)]) as s:
        assert await off_loop((s.mnt / "etc/hosts").read_bytes) == HOSTS
        s.session.close()
        assert mounts_at(s.mnt) == []
        await asyncio.wait_for(s.task, 10)
        s.session.close()  # idempotent
        assert await off_loop(os.listdir, s.mnt) == []  # the bare directory again
    with pytest.raises(RuntimeError):  # a closed session cannot serve
        await s.session.serve()


async def test_close_ends_requests_still_waiting_for_data(tmp_path: Path) -> None:
    layer, fetcher = build(tmp_path, 1)
    fetcher.gate = asyncio.Event()  # fetches wait forever
    async with serving(tmp_path, shared=False, layers=[layer]) as s:
        reading = asyncio.ensure_future(off_loop(errno_of, Path.read_bytes, s.mnt / "big.bin"))
        await asyncio.wait_for(fetcher.started.wait(), 30)
        s.session.close()  # the pending READ is cancelled and the connection goes away
        assert await reading in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)
        assert mounts_at(s.mnt) == []
        fetcher.gate.set()


def _read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def _read_mapped(path: Path) -> bytes:
    import mmap

    with open(path, "rb", buffering=0) as f, mmap.mmap(f.fileno(), 0,
                                                        prot=mmap.PROT_READ) as m:
        return bytes(m)


async def test_passthrough_serves_a_whole_file_and_never_mixes_modes(tmp_path: Path) -> None:
    b = LayerBuilder()
    node = b.file(ROOT_INO, "big.bin", BIG, chunk_size=1 << 18)
    index, blob = b.build()
    fetcher = FakeFetcher(blob)
    reader = ChunkReader({"": fetcher}, ChunkCache(tmp_path / "cache", 1 << 26),
                         whole_file_bytes=1 << 20)
    layer = MountedLayer(1, fetcher.digest, index, reader)
    async with serving(tmp_path, shared=False, layers=[layer]) as s:
        path = s.mnt / "big.bin"
        held = await off_loop(os.open, path, os.O_RDONLY)  # a page-cache handle, kept
        try:
            if not s.session.flags & w.PASSTHROUGH:  # known once INIT is answered
                pytest.fail("the kernel did not agree on FUSE passthrough (needs 6.9+)")
            assert await off_loop(_read_all, path) == BIG  # read to its end: stored whole
            for _ in range(200):
                if reader.whole_file_path(node) is not None:
                    break
                await asyncio.sleep(0.05)
            assert reader.whole_file_path(node) is not None
            # Another open while a page-cache handle is open must keep that mode (the
            # kernel answers a mixed open with EIO).
            assert await off_loop(_read_all, path) == BIG
            assert s.stats.passthrough_opens == 0
        finally:
            await off_loop(os.close, held)
        for _ in range(200):  # the kernel sends RELEASE after close, asynchronously
            if s.count("release") >= 3:
                break
            await asyncio.sleep(0.05)
        reads = s.count("read")
        assert await off_loop(_read_all, path) == BIG
        assert await off_loop(_read_mapped, path) == BIG
        assert s.stats.passthrough_opens == 2
        assert s.count("read") == reads  # the kernel read the cache file itself
