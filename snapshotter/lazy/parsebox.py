"""Untrusted layer metadata parsed in a bounded child process, so that `serve` survives it.

`lazysnap serve` checks every remote layer's index (an eStargz TOC, a nydus bootstrap)
before it tells containerd the layer exists. The parsers are bounded by their budgets
(``snapshotter.formats.limits``); this module is the second line: the parse runs in a
worker process whose address space is capped (``RLIMIT_AS``, single-threaded, so the cap
is close to its heap) and whose every call has a deadline. A parse that runs out of
memory, passes the deadline or kills its worker costs that worker only: it is replaced,
and the caller gets ``LimitExceeded`` (a ``FormatError``), so the layer falls back to an
ordinary pull with a typed reason while `serve` and every other layer go on.

Workers are fresh interpreters (``python -m snapshotter.lazy.parsebox --fd N``: never forked
from the multi-threaded gRPC process), started with the pool and again whenever one is
replaced. Each talks over one end of a socket pair with ``multiprocessing.connection``
framing: a call sends the task's name and arguments and gets back ``("ok", result)`` or
the error's class name and message; the errors that cross are rebuilt from
``snapshotter.errdefs`` by name (anything else becomes ``Internal``). Tasks are the
functions in ``TASKS``; they take and return plain data.

Failure modes of ``ParseBox.call``: the task's own ``LazysnapError`` subclasses;
``LimitExceeded`` for memory, deadline or a worker that died; ``Unavailable`` after
``aclose``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing.connection
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from snapshotter import errdefs
from snapshotter.errdefs import FormatError, Internal, LazysnapError, LimitExceeded, Unavailable
from snapshotter.formats import bootstrap_tar, estargz, rafs
from snapshotter.formats.limits import TocLimits

log = logging.getLogger(__name__)


# --- tasks (run in the worker) -------------------------------------------------------------


def check_estargz_toc(toc_json: bytes, blob_size: int, toc_offset: int,
                      limits: dict[str, int]) -> int:
    """Build the layer index of a TOC (names, types, ranges, budgets); return its inode
    count. Raises FormatError (LimitExceeded over a budget)."""
    budget = TocLimits.from_json(limits)
    index = estargz.build_index(toc_json, blob_size, data_end=toc_offset,
                                max_entries=budget.entries,
                                max_implicit_dirs=budget.implicit_dirs)
    return len(index.nodes)


def check_nydus_bootstrap(layer: bytes, limit: int) -> tuple[bytes, str, dict[str, int]]:
    """The bootstrap of a bootstrap layer blob, checked: ``(bootstrap, format, ends)``
    with ``ends`` the end of the last chunk in each data blob (``sha256:<id>`` keys).
    Raises FormatError (LimitExceeded over a bound; a blob id that is not sha256 hex)."""
    boot = bootstrap_tar.extract_bootstrap(layer, limit)
    index = rafs.build_index(boot)
    ends: dict[str, int] = {}
    for node in index.nodes.values():
        for chunk in node.chunks:
            ends[chunk.blob] = max(ends.get(chunk.blob, 0), chunk.blob_end)
    for blob in ends:
        if len(blob) != 64 or any(ch not in "0123456789abcdef" for ch in blob):
            raise FormatError(f"blob id {blob[:80]!r} is not a sha256 hex digest")
    return boot, index.format, {f"sha256:{blob}": end for blob, end in ends.items()}


def check_bootstrap_layer(layer: bytes, limit: int) -> int:
    """The size of the bootstrap a bootstrap layer blob holds (FormatError if none)."""
    return len(bootstrap_tar.extract_bootstrap(layer, limit))


TASKS: dict[str, Callable[..., Any]] = {
    "bootstrap_layer": check_bootstrap_layer,
    "estargz_toc": check_estargz_toc,
    "nydus_bootstrap": check_nydus_bootstrap,
}


def _worker_main(conn: multiprocessing.connection.Connection, memory_limit: int) -> None:
    """The worker's loop: one request, one reply, until the pipe closes."""
    if memory_limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[Any, ...] = ("ok", TASKS[name](*args))
        except MemoryError:
            reply = ("memory",)
        except LazysnapError as exc:
            reply = ("error", type(exc).__name__, str(exc)[:4000])
        except Exception as exc:  # a parser bug: reported, never hidden
            reply = ("error", "Internal", f"{type(exc).__name__}: {str(exc)[:4000]}")
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("memory",))
        if reply[0] == "memory":
            return  # the heap may be in any state: the parent starts a fresh worker


def _rebuild(name: str, message: str) -> LazysnapError:
    """The error a worker reported, as the errdefs class of that name (else Internal)."""
    cls = getattr(errdefs, name, None)
    if isinstance(cls, type) and issubclass(cls, LazysnapError) and cls is not \
            errdefs.RemoteLayerError:
        return cls(message)
    return Internal(f"{name}: {message}")


# --- the pool (in serve) -------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen[bytes]
    conn: multiprocessing.connection.Connection

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.conn.close()
        with contextlib.suppress(Exception):
            self.process.wait(5)


class ParseBox:
    """A small pool of bounded parser processes (see the module docstring).

    ``memory_limit``: each worker's address-space limit in bytes (0: none).
    ``timeout``: seconds one call may take before its worker is killed.
    ``workers``: calls that can run at once; more wait for a free worker.
    """

    def __init__(self, memory_limit: int, timeout: float, workers: int = 2) -> None:
        self.memory_limit = memory_limit
        self.timeout = timeout
        self._size = workers
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: set[_Worker] = set()
        self._closed = False

    def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, "--fd", str(child.fileno()),
                 "--memory-limit", str(self.memory_limit)],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker = _Worker(process, multiprocessing.connection.Connection(parent.detach()))
        self._all.add(worker)
        return worker

    async def start(self) -> None:
        """Start the workers (the first start also starts the fork server)."""
        if self._idle is not None:
            return
        self._idle = asyncio.Queue()
        workers = await asyncio.to_thread(lambda: [self._spawn() for _ in range(self._size)])
        for worker in workers:
            self._idle.put_nowait(worker)

    async def call(self, task: str, *args: Any) -> Any:
        """Run ``TASKS[task](*args)`` in a worker and return its result (see the module
        docstring for the errors)."""
        if self._closed:
            raise Unavailable("the parser pool is closed")
        await self.start()
        assert self._idle is not None
        worker = await self._idle.get()
        healthy = False
        try:
            reply = await asyncio.to_thread(self._round_trip, worker, task, args)
            healthy = reply[0] in ("ok", "error")
        finally:
            if healthy and not self._closed:
                self._idle.put_nowait(worker)
            else:  # dead, over its limits, or the caller gave up: replace it
                self._all.discard(worker)
                await asyncio.to_thread(worker.kill)
                if not self._closed:
                    self._idle.put_nowait(await asyncio.to_thread(self._spawn))
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "error":
            raise _rebuild(reply[1], reply[2])
        raise LimitExceeded(f"{task}: {reply[1]}")

    def _round_trip(self, worker: _Worker, task: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Send one call and wait for its reply (in a thread); a failure is a reply."""
        try:
            worker.conn.send((task, args))
            if not worker.conn.poll(self.timeout):
                return ("limit", f"the parse took over {self.timeout:g}s")
            reply = worker.conn.recv()
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(1)
            return ("limit", f"the parser process died (exit {worker.process.returncode})")
        if reply[0] == "memory":
            return ("limit", f"the parse needed more than {self.memory_limit} bytes of memory")
        assert isinstance(reply, tuple)
        return reply

    async def aclose(self) -> None:
        """Stop every worker; later calls raise Unavailable. Idempotent."""
        self._closed = True
        workers, self._all = list(self._all), set()
        for worker in workers:
            await asyncio.to_thread(worker.kill)


def main(argv: Sequence[str] | None = None) -> int:
    """The worker process: serve calls on the inherited socket ``--fd`` until it closes."""
    parser = argparse.ArgumentParser(prog="python -m snapshotter.lazy.parsebox")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--memory-limit", type=int, default=0)
    args = parser.parse_args(argv)
    _worker_main(multiprocessing.connection.Connection(args.fd), args.memory_limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
