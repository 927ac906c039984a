"""A pre-imported template process that forks FUSE daemons in milliseconds.

Starting a dedicated daemon with ``posix_spawn`` costs a Python start-up plus the imports
of the daemon (asyncio, aiohttp, the FUSE session, the format readers): 0.4-0.7 s per layer, paid
once per layer on the pull's critical path, since containerd prepares layers one by one.
The zygote pays it once: ``lazysnap serve`` starts it in dedicated mode, it imports
everything a daemon needs, and then, for each request, forks a child that *is* a daemon:

* the child leaves the zygote's session (``setsid``), gets ``/dev/null`` as stdin, the
  daemon's log as stdout/stderr and the control socket as fd 3, exactly like
  ``process.spawn``;
* its command line (``/proc/<pid>/cmdline``) is rewritten to the daemon command line the
  manager would have exec'd (``prctl(PR_SET_MM_MAP)``, see ``_set_cmdline``), so
  ``process.is_our_daemon`` and every tool that looks at command lines see an ordinary
  daemon; a child that cannot do this exits, and the request fails;
* it runs ``snapshotter.fs.__main__.main`` and ``_exit``s with its status.

The zygote is single-threaded and has no event loop when it forks. It ignores SIGCHLD
(children are reaped by the kernel; their exits are seen through pidfds, which work for
any process), and it asks for SIGTERM when ``lazysnap serve`` dies (``PR_SET_PDEATHSIG``);
daemons it forked are in their own sessions and live on.

Protocol, on a unix stream socket (socket activation: the manager listens, the zygote
gets the listening socket as fd 3): one request per connection, a JSON object
``{"argv": [...]}`` sent with two descriptors (log file, listening control socket), and
one JSON answer ``{"pid": N}`` or ``{"error": "..."}``. ``ZygoteClient.spawn`` raises
DaemonError for any failure, and the manager then falls back to ``process.spawn``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence

from snapshotter.errdefs import DaemonError

LISTEN_FD = 3
_PR_SET_PDEATHSIG = 1
_PR_SET_MM = 35
_PR_SET_MM_MAP = 14
_MAX_REQUEST = 1 << 16
# Everything a daemon imports, including what it imports lazily on its way to serving a
# layer (a module imported after the fork is compiled and executed again in every child).
_PRELOAD = ("asyncio", "snapshotter.fs.fuse.session", "snapshotter.formats.estargz",
            "snapshotter.fs.daemon", "snapshotter.metrics.counters",
            "snapshotter.fs.read.reader", "snapshotter.fs.ops", "snapshotter.fs.control",
            "snapshotter.fs.fuse.kernel", "snapshotter.fs.read.activity",
            "snapshotter.fs.read.fetchpolicy",
            "snapshotter.cache.chunkcache", "snapshotter.registry.registry",
            "snapshotter.registry.fetcher", "snapshotter.registry.ranges",
            "snapshotter.registry.platforms")
_KEEP_CMDLINE: list[ctypes.Array[ctypes.c_char]] = []  # the rewritten cmdline's memory


# --- the client (in lazysnap serve) ---------------------------------------------------------


class ZygoteClient:
    """Asks the zygote listening at ``path`` for daemons (blocking; call from a thread).

    ``timeout`` bounds each request, the zygote's own start-up (its imports) included;
    a zygote that does not answer in time is given up for good by the manager.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def spawn(self, argv: Sequence[str], log_path: str, control: socket.socket) -> int:
        """Fork a daemon running ``argv`` (a ``python -m snapshotter.fs ...`` command line);
        return its pid. Raises DaemonError."""
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout)
                conn.connect(self.path)
                request = json.dumps({"argv": list(argv)}).encode()
                socket.send_fds(conn, [request], [log_fd, control.fileno()])
                conn.shutdown(socket.SHUT_WR)
                answer = _read_all(conn)
        except OSError as exc:
            raise DaemonError(f"zygote at {self.path}: {exc}") from None
        finally:
            os.close(log_fd)
        try:
            reply = json.loads(answer)
            if "pid" in reply and isinstance(reply["pid"], int) and reply["pid"] > 0:
                return int(reply["pid"])
            raise DaemonError(f"zygote refused: {reply.get('error', 'no answer')}")
        except (ValueError, AttributeError):
            raise DaemonError(f"zygote answered {answer[:80]!r}") from None


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


# --- the zygote process ---------------------------------------------------------------------


def main() -> int:
    """``python -m daemon_manager.zygote``: serve fork requests on fd 3 until killed."""
    from snapshotter.fs import __main__ as daemon_main

    daemon_main.import_runtime()
    for name in _PRELOAD:  # imported once here, shared by every child
        importlib.import_module(name)
    gc.freeze()  # children's collections then leave these objects' pages unwritten (shared)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:
        return 0  # the snapshotter is gone already
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    listener = socket.socket(fileno=LISTEN_FD)
    listener.set_inheritable(False)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                reply = _serve_one(conn, listener, libc)
            except Exception as exc:  # one bad request must not end the zygote
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):  # the client gave up
                conn.sendall(json.dumps(reply).encode())


def _serve_one(conn: socket.socket, listener: socket.socket, libc: ctypes.CDLL
               ) -> dict[str, object]:
    msg, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 2)
    try:
        argv = json.loads(msg)["argv"]
        if (len(fds) != 2 or not isinstance(argv, list) or len(argv) < 4
                or not all(isinstance(a, str) for a in argv)
                or argv[1:3] != ["-m", "snapshotter.fs"]):
            return {"error": "bad request"}
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the daemon
            code = 70
            try:
                os.close(ready_r)
                code = _become_daemon(argv, fds[0], fds[1], ready_w, [conn, listener], libc)
            except BaseException:
                import traceback

                traceback.print_exc()  # to the daemon's log once fd 2 is set up
            finally:
                os._exit(code)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            ok = ready.read(1) == b"1"
        return {"pid": pid} if ok else {"error": "the forked daemon could not set itself up"}
    finally:
        for fd in fds:
            os.close(fd)


def _become_daemon(argv: list[str], log_fd: int, control_fd: int, ready_w: int,
                   close: list[socket.socket], libc: ctypes.CDLL) -> int:
    """In the child: the daemon's session, descriptors and command line, then its main."""
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    for sock in close:
        sock.close()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.dup2(control_fd, LISTEN_FD)
    for fd in {null, log_fd, control_fd} - {0, 1, 2, LISTEN_FD}:
        os.close(fd)
    _set_cmdline(argv, libc)
    os.write(ready_w, b"1")
    os.close(ready_w)
    sys.argv = [argv[0], *argv[3:]]
    from snapshotter.fs.__main__ import main as daemon

    return daemon(argv[3:])


class _MmMap(ctypes.Structure):
    """``struct prctl_mm_map`` of <linux/prctl.h>."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
        "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


def _set_cmdline(argv: Sequence[str], libc: ctypes.CDLL) -> None:
    """Make ``/proc/self/cmdline`` read ``argv``; raises OSError.

    ``PR_SET_MM_MAP`` with every other field as it is and no new executable needs no
    capability (``PR_SET_MM_ARG_START`` would need CAP_SYS_RESOURCE, which containers
    and some VMs drop); it needs a kernel built with CONFIG_CHECKPOINT_RESTORE.
    """
    raw = b"\0".join(a.encode() for a in argv) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    _KEEP_CMDLINE.append(buf)
    with open("/proc/self/stat", "rb") as f:
        stat = [0, 0, 0] + [int(x) if x.lstrip(b"-").isdigit() else 0
                            for x in f.read().rsplit(b")", 1)[1].split()]
    # /proc/<pid>/stat numbers its fields from 1 and the state is field 3.
    field = {n: stat[n] for n in range(3, len(stat))}
    libc.sbrk.restype = ctypes.c_void_p
    mm = _MmMap(
        start_code=field[26], end_code=field[27], start_data=field[45], end_data=field[46],
        start_brk=field[47], brk=libc.sbrk(0) or field[47], start_stack=field[28],
        arg_start=ctypes.addressof(buf), arg_end=ctypes.addressof(buf) + len(raw),
        env_start=field[50], env_end=field[51], auxv=0, auxv_size=0, exe_fd=0xFFFFFFFF,
    )
    if libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MM_MAP) failed: {os.strerror(err)}")


if __name__ == "__main__":
    sys.exit(main())
