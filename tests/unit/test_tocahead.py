"""TOC look-ahead: fetches started once per layer, taken once, failures and age ignored,
bounded, cancelled on close; and the label list it starts from."""

from __future__ import annotations

import asyncio

import pytest

from snapshotter import labels as L
from snapshotter.lazy.tocahead import Fetched, TocLookahead

REF = "registry.test/app:1"
D = ["sha256:" + c * 64 for c in "abcdef"]


class Fetcher:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: set[str] = set()
        self.running = 0
        self.most = 0

    async def __call__(self, ref: str, digest: str) -> Fetched:
        self.calls.append(digest)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.gate.wait()
            if digest in self.fail:
                raise OSError("connection reset")
            return Fetched(size=100, tail=digest.encode(), toc=b"{}")
        finally:
            self.running -= 1


async def test_each_layer_is_fetched_once_and_taken_once() -> None:
    f = Fetcher()
    ahead = TocLookahead(f)
    ahead.start(REF, D[1:4])
    ahead.start(REF, D[2:5])  # the next Prepare names the same layers again
    got = await ahead.take(REF, D[2])
    assert got is not None and got.tail == D[2].encode() and got.toc == b"{}"
    assert await ahead.take(REF, D[2]) is None  # taken
    assert await ahead.take(REF, D[0]) is None  # never started
    assert await ahead.take("other.test/app:1", D[1]) is None  # another reference
    await asyncio.sleep(0)
    assert sorted(f.calls) == sorted(D[1:5])
    await ahead.aclose()


async def test_take_waits_for_a_fetch_in_flight_and_failures_are_none() -> None:
    f = Fetcher()
    f.gate.clear()
    f.fail.add(D[2])
    ahead = TocLookahead(f)
    ahead.start(REF, [D[1], D[2]])
    waiting = asyncio.ensure_future(ahead.take(REF, D[1]))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    f.gate.set()
    assert (await waiting) is not None
    assert await ahead.take(REF, D[2]) is None
    await ahead.aclose()


async def test_concurrency_age_and_size_are_bounded() -> None:
    now = [0.0]
    f = Fetcher()
    f.gate.clear()
    ahead = TocLookahead(f, concurrency=2, ttl_s=10.0, max_entries=3, clock=lambda: now[0])
    ahead.start(REF, D[:5])  # five asked, three kept: the two oldest are dropped
    await asyncio.sleep(0.01)
    assert f.most <= 2
    f.gate.set()
    assert await ahead.take(REF, D[0]) is None
    assert await ahead.take(REF, D[2]) is not None
    now[0] = 11.0
    assert await ahead.take(REF, D[3]) is None  # too old
    await ahead.aclose()
    assert await ahead.take(REF, D[4]) is None  # closed: forgotten


async def test_a_cancelled_taker_leaves_the_fetch_alone() -> None:
    f = Fetcher()
    f.gate.clear()
    ahead = TocLookahead(f)
    ahead.start(REF, [D[1]])
    taker = asyncio.ensure_future(ahead.take(REF, D[1]))
    await asyncio.sleep(0.01)
    taker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taker
    f.gate.set()
    await ahead.aclose()


def test_following_layers_come_from_the_source_labels() -> None:
    cri = {L.CRI_IMAGE_REF: REF, L.CRI_LAYER_DIGEST: D[0],
           L.CRI_IMAGE_LAYERS: ",".join(D[:3])}
    assert L.following_layers(cri) == D[1:3]
    stargz = {L.STARGZ_REFERENCE: REF, L.STARGZ_DIGEST: D[1],
              L.STARGZ_LAYERS: f"{D[1]},{D[2]}, {D[3]},{D[2]},sha256:short,../x"}
    assert L.following_layers(stargz) == [D[2], D[3]]
    assert L.following_layers({L.STARGZ_LAYERS: ",".join(D)}) == []  # no source
    assert L.following_layers({L.STARGZ_REFERENCE: REF, L.STARGZ_DIGEST: D[0]}) == []
