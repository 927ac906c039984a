"""A FUSE session served on the asyncio loop straight from ``/dev/fuse`` (no libfuse).

Why not a binding: the read-only layer file system wants things pyfuse3/libfuse do not let
it say (``docs/design.md``, "Own FUSE session"): no OPENDIR round trips (answered ENOSYS
once, after which the kernel opens directories by itself and caches their listings),
OPEN only where passthrough can answer it, READ and READDIR addressed by inode, requests
read into one preallocated buffer and metadata answered inline without a task.

Life cycle: ``mount()`` opens ``/dev/fuse`` and mounts it with mount(2) (needs
CAP_SYS_ADMIN, as overlay mounts do); ``serve()`` answers requests until the file system
is unmounted (from outside, or by ``close``) or ``stop()`` is called; ``close()``
cancels pending reads, detaches the mount (``umount2(MNT_DETACH)``) and closes the device.

Requests:

* metadata (LOOKUP, GETATTR, READLINK, GETXATTR, LISTXATTR, ACCESS, STATFS, READDIR,
  READDIRPLUS) is answered inline by the synchronous handlers of ``FuseOperations``;
* READ: when ``ops.read_plan`` finds the bytes at hand, they are copied by one of
  ``read_threads`` threads (inline with 0); otherwise it runs as a task
  (``await ops.read``), at most ``max_tasks`` at once, after which the session stops
  reading requests until one finishes;
* OPEN/RELEASE: when the kernel agreed on passthrough at INIT (and ``ops`` has
  ``passthrough_file``), answered through ``passthrough.OpenModes``; otherwise OPEN is
  ENOSYS like the next ones;
* waiting: once no request is pending, the session keeps trying to read for ``spin_s``
  seconds before it returns to the event loop's poll. A program that walks or stats a
  tree sends its next request some 10-30 us after our answer; a thread asleep in
  ``epoll_wait`` takes longer than that to be woken (on this VM a GETXATTR round trip
  went from ~40 to ~25 us with 30-50 us of polling). The cost is at most ``spin_s`` of CPU
  per burst of requests, during which the loop runs nothing else;
* OPENDIR, FLUSH, FSYNC, locks, LSEEK, POLL, BMAP, STATX: ENOSYS, which the kernel
  remembers for the connection (no more such requests); IOCTL: ENOTTY;
* anything that would write: EROFS; FORGET/BATCH_FORGET: no answer (inodes are static);
  INTERRUPT: ENOSYS (the kernel stops sending them: requests are short or end in EIO).

Errors: a handler's ``FuseError`` is its answer; any other exception is logged and
answered EIO, so a bug never stops the session. A reply to a request the kernel has
dropped meanwhile (interrupted) fails with ENOENT and is ignored.

Kernel notifications (``invalidate_entry``/``invalidate_inode``) are written from a
thread of their own: the kernel may block such a write on a directory lock that a
request still waiting for this (single) thread holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from snapshotter.fs.fuse import wire as w
from snapshotter.fs.fuse.passthrough import OpenModes

log = logging.getLogger(__name__)

DEVICE = "/dev/fuse"
MAX_PAGES = 256  # 1 MiB READ requests
MAX_WRITE = 128 * 1024  # never used (read-only) but sizes the request buffer
_BUFFER = MAX_WRITE + 4096
_BATCH = 64  # requests read per readiness callback before giving other tasks a turn
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MNT_DETACH = 2
_BY_DESIGN = frozenset({w.OPEN, w.OPENDIR, w.RELEASE, w.RELEASEDIR, w.FLUSH, w.FSYNC,
                        w.FSYNCDIR, w.INTERRUPT, w.GETLK, w.SETLK, w.SETLKW, w.LSEEK,
                        w.POLL, w.BMAP, w.STATX, w.IOCTL, w.DESTROY})


class FuseOperations(Protocol):
    """The file system behind a session. Handlers raise ``fusewire.FuseError``."""

    def lookup(self, parent: int, name: bytes) -> w.Attr: ...
    def getattr(self, ino: int) -> w.Attr: ...
    def readlink(self, ino: int) -> bytes: ...
    def getxattr(self, ino: int, name: bytes) -> bytes: ...
    def listxattr(self, ino: int) -> Sequence[bytes]: ...
    def access(self, ino: int, mask: int) -> None: ...
    def statfs(self) -> w.StatFs: ...

    def readdir(self, ino: int, offset: int) -> Iterable[tuple[bytes, w.Attr, int]]:
        """Entries of directory ``ino`` from position ``offset``: (name, attributes,
        position of the next entry)."""
        ...

    def read(self, ino: int, offset: int, size: int) -> Awaitable[bytes]: ...

    def read_plan(self, ino: int, offset: int, size: int) -> CachedRead | None:
        """Where the bytes of a READ lie when they are at hand (no fetch needed), else
        None (then ``read`` is awaited)."""
        ...


@runtime_checkable
class PassthroughSource(Protocol):
    """Optional part of ``FuseOperations``: a local file holding all of a regular file's
    bytes, which the kernel may then read directly (FUSE passthrough)."""

    def passthrough_file(self, ino: int) -> str | None: ...


class CachedRead(Protocol):
    """Bytes of a READ that are at hand: ``size`` of them, copied by ``fill`` (which
    may run in any thread and returns False when they are gone after all)."""

    @property
    def size(self) -> int: ...

    def fill(self, buf: memoryview) -> bool: ...


class RequestStats(Protocol):
    """Where a session reports each request (``metrics.counters.FuseStats``)."""

    served_bytes: int
    passthrough_opens: int

    def observe(self, op: str, seconds: float, failed: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class MountOptions:
    """How the file system is mounted: ``<fsname>`` on ``<mountpoint>`` type
    ``fuse.<subtype>``, read-only, nosuid, nodev, permissions checked by the kernel."""

    fsname: str = "lazysnap"
    subtype: str = "lazysnap"
    allow_other: bool = True


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # the loaded libc (no ldconfig run)


def _os_error(what: str, path: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}", path)


class FuseSession:
    """One mounted FUSE file system and its request loop; see the module docstring."""

    def __init__(self, ops: FuseOperations, mountpoint: str, options: MountOptions, *,
                 max_tasks: int = 64, stats: RequestStats | None = None,
                 on_init: Callable[[], None] | None = None, read_threads: int = 2,
                 passthrough: bool = True, spin_s: float = 0.0) -> None:
        self._ops = ops
        self._spin_s = max(0.0, spin_s)
        self._mountpoint = mountpoint
        self._options = options
        self._max_tasks = max_tasks
        self._stats = stats
        self._on_init = on_init
        self._fd = -1
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._read_threads = read_threads
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # each reading thread's reply buffer
        self._stats_lock = threading.Lock()
        self._want_passthrough = passthrough and isinstance(ops, PassthroughSource)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = False
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.flags = 0  # the INIT flags agreed on
        self.reads_inline = 0  # READs answered from data at hand
        self.reads_waited = 0  # READs that needed a task (a fetch, or a chunk in flight)
        self._sync: dict[int, Callable[[int, memoryview], bytes]] = {
            w.LOOKUP: self._lookup, w.GETATTR: self._getattr, w.READLINK: self._readlink,
            w.GETXATTR: self._getxattr, w.LISTXATTR: self._listxattr,
            w.ACCESS: self._access, w.STATFS: self._statfs,
            w.READDIR: self._readdir, w.READDIRPLUS: self._readdirplus,
            w.OPEN: self._open, w.RELEASE: self._release,
        }
        self._modes: OpenModes | None = None  # with passthrough: set at mount

    # --- mount and unmount ----------------------------------------------------------------

    def mount(self) -> None:
        """Open the device and mount it; raises OSError (nothing left open or mounted)."""
        if not stat.S_ISDIR(os.stat(self._mountpoint).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "mount point is not a directory",
                                     self._mountpoint)
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        opts = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}", "default_permissions"]
        if self._options.allow_other:
            opts.append("allow_other")
        rc = _libc().mount(
            self._options.fsname.encode(), os.fsencode(self._mountpoint),
            f"fuse.{self._options.subtype}".encode(), _MS_RDONLY | _MS_NOSUID | _MS_NODEV,
            ",".join(opts).encode())
        if rc != 0:
            exc = _os_error("mount(2) of a FUSE file system failed", self._mountpoint)
            os.close(fd)
            raise exc
        self._fd = fd
        source = getattr(self._ops, "passthrough_file", None)
        if self._want_passthrough and source is not None:
            self._modes = OpenModes(fd, source)

    def close(self) -> None:
        """Stop serving, cancel pending reads, detach the mount and close the device.
        Idempotent; an already unmounted file system is fine."""
        self.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._fd < 0:
            return
        if self._pool is not None:  # its threads write replies to the device
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        log.info("closing %s: %d reads answered from the cache, %d waited for a fetch",
                 self._mountpoint, self.reads_inline, self.reads_waited)
        if _libc().umount2(os.fsencode(self._mountpoint), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted (any more)
                log.warning("unmount of %s failed: %s", self._mountpoint, os.strerror(code))
        os.close(self._fd)
        self._fd = -1

    # --- the request loop -----------------------------------------------------------------

    async def serve(self) -> None:
        """Answer requests until unmounted or ``stop()``; raises OSError when reading the
        device fails for another reason."""
        if self._fd < 0:
            raise RuntimeError("serve() before mount()")
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._resume()
        try:
            await self._done
        finally:
            self._pause()

    def stop(self) -> None:
        """Make ``serve`` return (idempotent)."""
        self._pause()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _finish(self, exc: BaseException | None = None) -> None:
        self._pause()
        if self._done is not None and not self._done.done():
            if exc is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(exc)

    def _resume(self) -> None:
        if not self._reading and self._loop is not None and self._fd >= 0:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _readable(self) -> None:
        spin_until = 0.0
        handled = 0
        while handled < _BATCH:
            if len(self._tasks) >= self._max_tasks:
                self._pause()  # resumed when a read finishes
                return
            try:
                n = os.readv(self._fd, [self._buf])
            except BlockingIOError:
                if self._spin_s <= 0:
                    return
                now = time.perf_counter()
                if spin_until == 0.0:
                    spin_until = now + self._spin_s
                elif now >= spin_until:
                    return
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    log.info("%s was unmounted", self._mountpoint)
                    self._finish()
                else:
                    self._finish(exc)
                return
            handled += 1
            spin_until = 0.0
            self._dispatch(self._view[:n])

    def _dispatch(self, req: memoryview) -> None:
        try:
            length, opcode, unique, nodeid, _, _, _ = w.parse_header(req)
        except w.ProtocolError as exc:
            log.error("ignoring a request: %s", exc)
            return
        body = req[w.IN_HEADER.size:length]
        handler = self._sync.get(opcode)
        if handler is not None:
            started = time.perf_counter()
            error, payload = 0, b""
            try:
                payload = handler(nodeid, body)
            except w.FuseError as exc:
                error = exc.errno
            except Exception:
                log.exception("%s of inode %d failed", w.OPCODE_NAMES[opcode], nodeid)
                error = errno.EIO
            self._reply(unique, error, payload)
            by_design = error == errno.ENOSYS and opcode in _BY_DESIGN
            self._observe(opcode, started, error != 0 and not by_design)
        elif opcode == w.READ:
            _, offset, size, _ = w.READ_IN.unpack_from(body)
            plan = self._ops.read_plan(nodeid, offset, size)
            if plan is not None:
                self.reads_inline += 1
                if self._read_threads > 0 and plan.size > 0:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(self._read_threads, "fuse-read")
                    self._pool.submit(self._read_cached, unique, nodeid, offset, size, plan)
                else:
                    self._read_cached(unique, nodeid, offset, size, plan)
                return
            self._start_read(unique, nodeid, offset, size)
        elif opcode in w.NO_REPLY_OPCODES:
            self._observe(opcode, time.perf_counter(), False)
        elif opcode == w.INIT:
            self._init(unique, body)
        elif opcode in w.WRITE_OPCODES:
            self._reply(unique, errno.EROFS, b"")
            self._observe(opcode, time.perf_counter(), True)
        else:
            self._reply(unique, errno.ENOTTY if opcode == w.IOCTL else errno.ENOSYS, b"")
            if opcode in _BY_DESIGN:
                self._observe(opcode, time.perf_counter(), False)
            if opcode == w.DESTROY:
                self._finish()

    def _observe(self, opcode: int, started: float, failed: bool) -> None:
        if self._stats is not None:
            seconds = time.perf_counter() - started
            with self._stats_lock:  # reading threads report too
                self._stats.observe(w.OPCODE_NAMES.get(opcode, f"op{opcode}"), seconds,
                                    failed)

    def _reply(self, unique: int, error: int, payload: bytes | memoryview) -> None:
        header = w.out_header(unique, -error if error else 0, 0 if error else len(payload))
        try:
            if error or not payload:
                os.write(self._fd, header)
            else:
                os.writev(self._fd, [header, payload])
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the kernel dropped the request (interrupted)
                return
            if exc.errno == errno.ENODEV:
                self._finish()
                return
            log.error("reply to request %d failed: %s", unique, exc)

    def _init(self, unique: int, body: memoryview) -> None:
        try:
            offer = w.parse_init(body)
            reply, self.flags = w.init_reply(offer, max_background=self._max_tasks,
                                             max_write=MAX_WRITE, max_pages=MAX_PAGES,
                                             passthrough=self._want_passthrough)
        except w.ProtocolError as exc:
            log.error("cannot serve this kernel: %s", exc)
            self._reply(unique, errno.EPROTO, b"")
            self._finish(exc)
            return
        self._reply(unique, 0, reply)
        log.debug("FUSE INIT: kernel 7.%d, flags %#x agreed", offer.minor, self.flags)
        if self._on_init is not None:
            try:
                self._on_init()
            except Exception:
                log.exception("INIT hook failed")

    # --- reads ----------------------------------------------------------------------------

    def _read_cached(self, unique: int, ino: int, offset: int, size: int,
                     plan: CachedRead) -> None:
        """Answer a READ whose bytes are at hand, through this thread's reusable reply
        buffer (in a reading thread, or inline on the loop); if they are gone after all,
        the READ takes the asynchronous path."""
        started = time.perf_counter()
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < plan.size:
            buf = self._local.buf = memoryview(bytearray(max(plan.size, MAX_PAGES * 4096)))
        if not plan.fill(buf):
            if threading.current_thread() is threading.main_thread():
                self._start_read(unique, ino, offset, size)
            elif self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: so is the mount
                    self._loop.call_soon_threadsafe(self._start_read, unique, ino, offset,
                                                    size)
            return
        self._reply(unique, 0, buf[: plan.size])
        self._observe(w.READ, started, False)
        if self._stats is not None:
            with self._stats_lock:
                self._stats.served_bytes += plan.size

    def _start_read(self, unique: int, ino: int, offset: int, size: int) -> None:
        self.reads_waited += 1
        task = asyncio.ensure_future(self._read(unique, ino, offset, size))
        self._tasks.add(task)
        task.add_done_callback(self._read_done)

    async def _read(self, unique: int, ino: int, offset: int, size: int) -> None:
        started = time.perf_counter()
        error, data = 0, b""
        try:
            data = await self._ops.read(ino, offset, size)
        except w.FuseError as exc:
            error = exc.errno
        except asyncio.CancelledError:
            error = errno.EIO
            raise
        except Exception:
            log.exception("read of inode %d failed", ino)
            error = errno.EIO
        finally:
            if self._fd >= 0:
                self._reply(unique, error, data)
            self._observe(w.READ, started, error != 0)
        if self._stats is not None:
            with self._stats_lock:
                self._stats.served_bytes += len(data)

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._done is not None and not self._done.done():
            self._resume()

    # --- metadata handlers: (nodeid, body) -> reply payload --------------------------------

    def _lookup(self, nodeid: int, body: memoryview) -> bytes:
        return w.entry_out(self._ops.lookup(nodeid, w.cstring(body)))

    def _getattr(self, nodeid: int, body: memoryview) -> bytes:
        return w.attr_out(self._ops.getattr(nodeid))

    def _readlink(self, nodeid: int, body: memoryview) -> bytes:
        return self._ops.readlink(nodeid)

    def _getxattr(self, nodeid: int, body: memoryview) -> bytes:
        size, _ = w.GETXATTR_IN.unpack_from(body)
        value = self._ops.getxattr(nodeid, w.cstring(body, w.GETXATTR_IN.size))
        return _sized(value, size)

    def _listxattr(self, nodeid: int, body: memoryview) -> bytes:
        size, _ = w.GETXATTR_IN.unpack_from(body)
        names = b"".join(name + b"\0" for name in self._ops.listxattr(nodeid))
        return _sized(names, size)

    def _access(self, nodeid: int, body: memoryview) -> bytes:
        mask, _ = w.ACCESS_IN.unpack_from(body)
        self._ops.access(nodeid, mask)
        return b""

    def _statfs(self, nodeid: int, body: memoryview) -> bytes:
        s = self._ops.statfs()
        return w.statfs_out(blocks=s.blocks, files=s.files, bsize=s.bsize, namelen=s.namelen)

    def _readdir(self, nodeid: int, body: memoryview) -> bytes:
        return self._listing(nodeid, body, plus=False)

    def _readdirplus(self, nodeid: int, body: memoryview) -> bytes:
        return self._listing(nodeid, body, plus=True)

    def _listing(self, nodeid: int, body: memoryview, *, plus: bool) -> bytes:
        """Whole directory records from the requested position, as many as fit."""
        _, offset, size, _ = w.READ_IN.unpack_from(body)
        out = w.DirentBuffer(size)
        for name, attr, next_off in self._ops.readdir(nodeid, offset):
            record = (w.direntplus(attr, next_off, name) if plus
                      else w.dirent(attr.st_ino, next_off, name, attr.st_mode))
            if not out.add(record):
                break
        return b"".join(out.parts)

    # --- opens: passthrough -------------------------------------------------------------

    def _open(self, nodeid: int, body: memoryview) -> bytes:
        """Without passthrough: ENOSYS, after which the kernel opens files by itself
        (page cache kept). With it: the mode ``passthrough.OpenModes`` chooses."""
        if not self.flags & w.PASSTHROUGH or self._modes is None:
            raise w.FuseError(errno.ENOSYS)
        flags, _ = w.OPEN_IN.unpack_from(body)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise w.FuseError(errno.EROFS)
        open_flags, backing, fh = self._modes.open(nodeid)
        if open_flags & w.FOPEN_PASSTHROUGH and self._stats is not None:
            with self._stats_lock:
                self._stats.passthrough_opens += 1
        return w.open_out(open_flags, backing, fh=fh)

    def _release(self, nodeid: int, body: memoryview) -> bytes:
        if self._modes is not None:
            self._modes.release(nodeid)
        return b""

    # --- notifications --------------------------------------------------------------------

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Ask the kernel to forget the cached entry ``name`` of directory ``parent``."""
        self._notify(w.notify_inval_entry(parent, name))

    def invalidate_inode(self, ino: int) -> None:
        """Ask the kernel to drop the cached attributes and pages (for a directory: the
        cached listing) of ``ino``."""
        self._notify(w.notify_inval_inode(ino))

    def _notify(self, message: bytes) -> None:
        """Write ``message`` from a daemon thread of its own, through a duplicate of the
        device descriptor that the thread closes: the write may wait for a directory
        lock, and no later ``close`` can make it write to a reused descriptor number."""
        if self._fd < 0:
            return
        fd = os.dup(self._fd)
        threading.Thread(target=_write_notification, args=(fd, message),
                         name="fuse-notify", daemon=True).start()


def _write_notification(fd: int, message: bytes) -> None:
    try:
        os.write(fd, message)
    except OSError as exc:  # ENOENT: nothing cached; ENODEV/ENOTCONN: the session is gone
        if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN):
            log.warning("kernel notification failed: %s", exc)
    finally:
        os.close(fd)


def _sized(value: bytes, size: int) -> bytes:
    """The answer to a GETXATTR/LISTXATTR that allows ``size`` bytes (0: asks the size)."""
    if size == 0:
        return w.getxattr_size(len(value))
    if len(value) > size:
        raise w.FuseError(errno.ERANGE)
    return value
