"""The bounded parser processes of `serve` (snapshotter.lazy.parsebox), with real workers.

A parse that fails, runs out of memory, passes its deadline or loses its process gives a
typed error, and the pool keeps answering afterwards with fresh workers.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from snapshotter.errdefs import FormatError, LimitExceeded, Unavailable
from snapshotter.formats.limits import TocLimits
from snapshotter.lazy.parsebox import ParseBox

GOOD = json.dumps({"version": 1, "entries": [{"name": "a/b", "type": "dir"}]}).encode()
LIMITS = TocLimits().to_json()


def big_toc(entries: int) -> bytes:
    return json.dumps({"version": 1, "entries": [
        {"name": f"usr/lib/p{i // 50}/m_{i}.py", "type": "reg", "size": 1234,
         "offset": 1000 + i * 500, "digest": "sha256:" + "a" * 64}
        for i in range(entries)]}).encode()


async def check(box: ParseBox, doc: bytes) -> int:
    result = await box.call("estargz_toc", doc, 1 << 40, (1 << 40) - 1000, LIMITS)
    assert isinstance(result, int)
    return result


async def test_a_good_toc_is_checked_and_a_bad_one_refused_with_its_own_error() -> None:
    box = ParseBox(memory_limit=1 << 30, timeout=30.0)
    try:
        assert await check(box, GOOD) == 3  # root, a, a/b
        with pytest.raises(FormatError, match="not valid JSON"):
            await check(box, b"{")
        with pytest.raises(LimitExceeded, match="JSON arrays"):
            await check(box, b'{"version":1,"entries":[' + b"[]," * 2_000_000 + b"[]]}")
        assert await check(box, GOOD) == 3
    finally:
        await box.aclose()


async def test_a_parse_over_the_memory_limit_costs_only_its_worker() -> None:
    box = ParseBox(memory_limit=300 << 20, timeout=60.0, workers=1)
    try:
        with pytest.raises(LimitExceeded, match="memory"):
            await check(box, big_toc(400_000))  # about 600 MB to index
        assert await check(box, GOOD) == 3
    finally:
        await box.aclose()


async def test_a_parse_over_its_deadline_is_stopped_and_the_pool_goes_on() -> None:
    box = ParseBox(memory_limit=0, timeout=0.05, workers=1)
    doc = big_toc(200_000)
    try:
        with pytest.raises(LimitExceeded, match="took over"):
            await check(box, doc)
        box.timeout = 30.0
        assert await check(box, GOOD) == 3
    finally:
        await box.aclose()


async def test_a_worker_that_dies_is_replaced() -> None:
    box = ParseBox(memory_limit=0, timeout=30.0, workers=1)
    try:
        assert await check(box, GOOD) == 3
        (worker,) = list(box._all)
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(5)
        with pytest.raises(LimitExceeded, match="died"):
            await check(box, GOOD)
        assert await check(box, GOOD) == 3
    finally:
        await box.aclose()
    with pytest.raises(Unavailable):
        await check(box, GOOD)
