"""bench.delayproxy: bytes arrive complete and in order, half-closes are passed on, and a
queue far smaller than the data only slows the transfer down (no timing is asserted)."""

from __future__ import annotations

import asyncio
import hashlib
import os

from bench.delayproxy import DelayProxy


async def _serve_sink(results: list[bytes]) -> tuple[asyncio.Server, int]:
    """A server that reads to EOF, answers with the sha256 of what it got, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        results.append(data)
        writer.write(hashlib.sha256(data).hexdigest().encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _through_proxy(payload: bytes, queue_bytes: int) -> tuple[bytes, list[bytes]]:
    results: list[bytes] = []
    server, port = await _serve_sink(results)
    proxy = DelayProxy(("127.0.0.1", port), delay=0.002, queue_bytes=queue_bytes)
    stop = asyncio.Event()
    task = asyncio.ensure_future(proxy.serve(("127.0.0.1", 0), stop))
    try:
        listen_port = await _listen_port(proxy)
        reader, writer = await asyncio.open_connection("127.0.0.1", listen_port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        return answer, results
    finally:
        stop.set()
        await task
        server.close()
        await server.wait_closed()


async def _listen_port(proxy: DelayProxy) -> int:
    for _ in range(1000):
        if proxy.port:
            return proxy.port
        await asyncio.sleep(0.001)
    raise AssertionError("proxy never listened")


def test_bytes_arrive_in_order_and_eof_is_passed_on() -> None:
    payload = os.urandom(3 << 20)
    answer, seen = asyncio.run(_through_proxy(payload, queue_bytes=4 << 20))
    assert seen == [payload]
    assert answer == hashlib.sha256(payload).hexdigest().encode()


def test_a_small_queue_applies_backpressure_without_losing_data() -> None:
    payload = os.urandom(2 << 20)
    answer, seen = asyncio.run(_through_proxy(payload, queue_bytes=1))  # floor: 256 KiB
    assert seen == [payload]
    assert answer == hashlib.sha256(payload).hexdigest().encode()
