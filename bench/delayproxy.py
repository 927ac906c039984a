"""A delaying TCP proxy: the "distance" half of the benchmark's emulated WAN link.

Run as ``python -m bench.delayproxy --listen HOST:PORT --upstream HOST:PORT --delay S``.
Every byte read from one side is handed to the other side ``delay`` seconds (one way,
half the round trip) after it arrived, in order. Per direction at most ``--queue-bytes``
are held (queued plus not yet written); above that the proxy stops reading that side, so
TCP flow control pushes back on the sender as a full link buffer would.

TCP is terminated here, so the client's ``connect`` completes at once; to charge the
handshake's round trip that a real link has, bytes from the client are not released to
the server before ``accept time + 3 x delay`` (SYN, SYN-ACK, then the first data).
Closing is delayed like data: an EOF is passed on when everything before it was.

``--bind-device`` pins the upstream socket to one network device (SO_BINDTODEVICE), so
that the proxy can only ever reach the registry over the benchmark's own veth. The rate
is not limited here: tbf on that veth does it (see ``bench.wan``).

The process prints ``ready <port>`` on stdout once it listens and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence

MIN_QUEUE_BYTES = 256 * 1024
# Release times are rounded to this grid so that the bytes of many packets leave in one
# timer callback and one write: the proxy's CPU cost then depends little on the packet
# rate, and the delay is off by at most half a tick (never early on average).
TICK_S = 0.0005


# Systematic lateness taken off every delay: bytes wait up to a tick in the socket buffer
# (reads are batched per tick) and the event loop's epoll timeout is whole milliseconds,
# rounded up, so a timer fires on average half a millisecond late.
EARLY_S = TICK_S / 2 + 0.0005


def _tick(t: float) -> float:
    """``t`` rounded to the nearest multiple of ``TICK_S``."""
    return round(t / TICK_S) * TICK_S


class _Pipe:
    """One direction of one connection: delays what ``feed`` gets, then writes it out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, limit: int,
                 not_before: float = 0.0) -> None:
        self.loop = loop
        self.delay = delay
        self.limit = limit
        self.not_before = not_before
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.changed: asyncio.Event | None = None
        self.napping = False

    def feed(self, data: bytes | None) -> None:
        """Queue ``data`` (None: the source's EOF) for release after the delay."""
        release = max(_tick(self.loop.time() + self.delay - EARLY_S), self.not_before)
        self.queue.append((release, data))
        self.queued += len(data) if data else 0
        self._apply_backpressure()
        if self.timer is None:
            self._schedule()

    def wake(self) -> None:
        """End a read pause taken by ``_Side.data_received`` (unless backpressure holds)."""
        self.napping = False
        if self.src is not None and not self.paused and not self.src.is_closing():
            self.src.resume_reading()

    def _backlog(self) -> int:
        pending = self.dst.get_write_buffer_size() if self.dst is not None else 0
        return self.queued + pending

    def _apply_backpressure(self) -> None:
        if self.src is None or self.src.is_closing():
            return
        if not self.paused and self._backlog() > self.limit:
            self.src.pause_reading()
            self.paused = True
        elif self.paused and self._backlog() <= self.limit // 2:
            self.paused = False
            if not self.napping:
                self.src.resume_reading()

    def _schedule(self) -> None:
        if self.queue and self.dst is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)
        else:
            self.timer = None

    def flush(self) -> None:
        """Write out everything whose release time has come (in order)."""
        self.timer = None
        now = self.loop.time()
        dst = self.dst
        due: list[bytes] = []
        while dst is not None and self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is not None:
                due.append(data)
                continue
            self._write(due)
            due = []
            if dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
            self.closed = True
            if self.changed is not None:
                self.changed.set()
        self._write(due)
        self._apply_backpressure()
        self._schedule()

    def _write(self, chunks: list[bytes]) -> None:
        """One write for everything due together (fewer system calls)."""
        if not chunks or self.dst is None:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.queued -= len(data)
        if not self.dst.is_closing():
            self.dst.write(data)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0


class _Side(asyncio.Protocol):
    """The protocol of one socket; feeds ``inbound`` and is written by the other pipe."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe, on_lost: asyncio.Event) -> None:
        self.inbound = inbound
        self.outbound = outbound
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbound.src = transport
        self.outbound.dst = transport
        self.outbound.flush()

    def data_received(self, data: bytes) -> None:
        self.inbound.feed(data)
        # Read at most once per tick: a paced link delivers one packet per wake-up, and
        # the bytes wait in the socket buffer at most a tick (one is taken off the delay).
        pipe = self.inbound
        if pipe.src is not None and not pipe.paused and not pipe.napping:
            pipe.src.pause_reading()
            pipe.napping = True
            pipe.loop.call_later(TICK_S, pipe.wake)

    def eof_received(self) -> bool:
        self.inbound.feed(None)
        return True  # keep the socket open for writing: half-close as TCP does

    def pause_writing(self) -> None:
        self.outbound._apply_backpressure()

    def resume_writing(self) -> None:
        self.outbound._apply_backpressure()
        self.outbound.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost.set()


class DelayProxy:
    """Accepts clients on ``listen`` and relays each to ``upstream`` with the delay."""

    def __init__(self, upstream: tuple[str, int], delay: float, queue_bytes: int,
                 bind_device: str = "") -> None:
        self.upstream = upstream
        self.delay = delay
        self.queue_bytes = max(queue_bytes, MIN_QUEUE_BYTES)
        self.bind_device = bind_device
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0  # the listening port, once listening

    def _upstream_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.bind_device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                            self.bind_device.encode())
        sock.setblocking(False)
        return sock

    async def _relay(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        up_pipe = _Pipe(loop, self.delay, self.queue_bytes, loop.time() + 3 * self.delay)
        down_pipe = _Pipe(loop, self.delay, self.queue_bytes)
        lost = asyncio.Event()
        up_pipe.changed = down_pipe.changed = lost
        client_side = _Side(up_pipe, down_pipe, lost)
        transports: list[asyncio.BaseTransport] = []
        try:
            ctr, _ = await loop.connect_accepted_socket(lambda: client_side, client)
            transports.append(ctr)
            sock = self._upstream_socket()
            await loop.sock_connect(sock, self.upstream)
            utr, _ = await loop.create_connection(
                lambda: _Side(down_pipe, up_pipe, lost), sock=sock)
            transports.append(utr)
            while not (up_pipe.closed and down_pipe.closed):
                await lost.wait()
                lost.clear()
                if any(t.is_closing() for t in transports):
                    # one side went away: give queued bytes their delay, then stop
                    await asyncio.sleep(self.delay + 0.001)
                    break
        except OSError:
            pass
        finally:
            up_pipe.cancel()
            down_pipe.cancel()
            for tr in transports:
                tr.close()
            if not transports:
                client.close()

    async def serve(self, listen: tuple[str, int], stop: asyncio.Event) -> None:
        """Accept until ``stop`` is set; prints ``ready <port>`` once listening."""
        loop = asyncio.get_running_loop()
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(listen)
        lsock.listen(256)
        lsock.setblocking(False)
        self.port = lsock.getsockname()[1]
        print(f"ready {self.port}", flush=True)
        accept = asyncio.ensure_future(self._accept_loop(loop, lsock))
        await stop.wait()
        accept.cancel()
        lsock.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(accept, *self.tasks, return_exceptions=True)

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop, lsock: socket.socket) -> None:
        while True:
            client, _ = await loop.sock_accept(lsock)
            task = loop.create_task(self._relay(client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m bench.delayproxy",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, type=_hostport)
    ap.add_argument("--upstream", required=True, type=_hostport)
    ap.add_argument("--delay", required=True, type=float, help="one-way delay, seconds")
    ap.add_argument("--queue-bytes", type=int, default=4 << 20)
    ap.add_argument("--bind-device", default="")
    args = ap.parse_args(argv)
    # A late wake-up is added delay: on a busy machine run ahead of ordinary processes.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        proxy = DelayProxy(args.upstream, args.delay, args.queue_bytes, args.bind_device)
        await proxy.serve(args.listen, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
