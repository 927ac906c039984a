"""Prefetch and background-fetch policy, against a fake bulk fetcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from snapshotter.errdefs import RegistryUnavailable
from snapshotter.formats.index import ROOT_INO, LayerIndex, Node
from snapshotter.fs.read.activity import Activity
from snapshotter.fs.read.fetchpolicy import (
    BACKGROUND_BATCH_BYTES,
    FetchPolicy,
    FetchProgress,
    background_nodes,
    prefetch_nodes,
)
from tests.unit.test_fs_fakes import LayerBuilder

LOG = logging.LoggerAdapter(logging.getLogger("test"), {})


class Bulk:
    def __init__(self, fail: BaseException | None = None, hang: bool = False) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.fail = fail
        self.hang = hang

    async def fetch_all(
        self,
        nodes: Iterable[Node],
        rate_limit_bytes_per_s: int = 0,
        *,
        batch_bytes: int = 4 << 20,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        nodes = list(nodes)
        self.calls.append(([str(n.ino) for n in nodes], rate_limit_bytes_per_s))
        self.batch_bytes = batch_bytes
        if gate is not None:
            await gate()
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        return sum(n.size for n in nodes)


def layer() -> tuple[LayerIndex, dict[str, Node]]:
    b = LayerBuilder()
    files = {name: b.file(ROOT_INO, name, name.encode() * 10) for name in ("a", "b", "c", "d")}
    b.file(ROOT_INO, "empty", b"")
    index, _ = b.build()
    return index, files


def test_prefetch_plan_follows_the_landmarks() -> None:
    index, f = layer()
    assert prefetch_nodes(index) == []  # no landmark information: nothing
    index.prefetch_inos = [f["c"].ino, f["a"].ino, 999]
    assert prefetch_nodes(index) == [f["c"], f["a"]]
    index.prefetch_blob_end = f["b"].chunks[0].blob_end  # a and b lie before the landmark
    assert prefetch_nodes(index) == [f["c"], f["a"], f["b"]]
    index.no_prefetch = True
    assert prefetch_nodes(index) == []


def test_background_plan_is_every_file_with_data_in_blob_order() -> None:
    index, f = layer()
    assert background_nodes(index) == [f["a"], f["b"], f["c"], f["d"]]


async def test_prefetch_then_background() -> None:
    index, f = layer()
    index.prefetch_inos = [f["b"].ino]
    bulk, progress = Bulk(), FetchProgress()
    policy = FetchPolicy(prefetch_timeout_s=30, background=True, background_rate_bytes_per_s=77)
    await policy.prefetch(bulk, index, progress, LOG)
    assert progress.prefetch_done and progress.prefetch_error is None
    await policy.background_fetch(bulk, index, progress, LOG)
    assert progress.fully_fetched
    assert bulk.calls == [([str(f["b"].ino)], 0), ([str(f[n].ino) for n in "abcd"], 77)]


async def test_prefetch_failures_and_timeouts_only_degrade() -> None:
    index, f = layer()
    index.prefetch_inos = [f["a"].ino]
    progress = FetchProgress()
    await FetchPolicy(30, False).prefetch(Bulk(fail=RegistryUnavailable("down")), index,
                                          progress, LOG)
    assert not progress.prefetch_done and "down" in (progress.prefetch_error or "")
    progress = FetchProgress()
    await FetchPolicy(0.01, False).prefetch(Bulk(hang=True), index, progress, LOG)
    assert not progress.prefetch_done and "timed out" in (progress.prefetch_error or "")


async def test_disabled_prefetch_and_background() -> None:
    index, f = layer()
    index.prefetch_inos = [f["a"].ino]
    bulk, progress = Bulk(), FetchProgress()
    policy = FetchPolicy(prefetch_timeout_s=0, background=False)
    await policy.prefetch(bulk, index, progress, LOG)
    await policy.background_fetch(bulk, index, progress, LOG)
    assert bulk.calls == [] and progress.prefetch_done and not progress.fully_fetched
    await FetchPolicy(1, True).background_fetch(Bulk(fail=RegistryUnavailable("x")), index,
                                                progress, LOG)
    assert not progress.fully_fetched and progress.background_error


class Clock:
    """A fake wall clock whose ``sleep`` advances time instead of waiting."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_background_fetch_waits_for_silence_then_runs_in_small_batches() -> None:
    index, _ = layer()
    clock = Clock()
    activity = Activity(None, clock=clock, sleep=clock.sleep)
    activity.note()  # a read just happened
    clock.now += 1.0
    bulk, progress = Bulk(), FetchProgress()
    policy = FetchPolicy(1, True, background_silence_s=5.0)
    await policy.background_fetch(bulk, index, progress, LOG, activity)
    assert clock.slept == [4.0]  # the rest of the silence period, then the fetch
    assert progress.fully_fetched and bulk.batch_bytes == BACKGROUND_BATCH_BYTES


async def test_activity_is_shared_through_the_file(tmp_path: Path) -> None:
    clock = Clock(now=2_000_000_000.0)
    path = str(tmp_path / "activity")
    one = Activity(path, clock=clock, sleep=clock.sleep)
    other = Activity(path, clock=clock, sleep=clock.sleep)
    assert other.idle_for() == clock.now  # nothing recorded anywhere yet
    one.note()  # creates the file, mtime = now
    clock.now += 2.0
    assert other.idle_for() == 2.0  # the other daemon sees it through the file
    await other.wait_quiet(5.0)
    assert clock.slept == [3.0]
    one.note()
    one.note()  # within TOUCH_INTERVAL_S: no second utime, still counted locally
    assert one.idle_for() == 0.0


async def test_activity_file_problems_degrade_to_local_activity(tmp_path: Path) -> None:
    clock = Clock()
    activity = Activity(str(tmp_path / "missing-dir" / "activity"), clock=clock,
                        sleep=clock.sleep)
    activity.note()  # cannot create the file: warned once, local time kept
    clock.now += 1.5
    assert activity.idle_for() == 1.5
    await activity.wait_quiet(0)  # no silence asked: returns at once
    assert clock.slept == []
