"""TOC look-ahead: fetch the footers and TOCs of an image's next layers while containerd
prepares the current one.

containerd prepares the layers of an image one after another, and each remote Prepare
spends at least one registry round trip (plus the TOC's transfer) reading its layer's
end. The labels of a layer name the layers that follow it (``cri.image-layers`` /
``stargz.layers``), so on the first Prepare the ends of the next layers can be fetched
concurrently; their Prepares then start from bytes already here.

Contracts:

* ``start(ref, digests)`` schedules one fetch per digest not already fetched or being
  fetched, at most ``concurrency`` at a time; never raises, never blocks.
* ``take(ref, digest)`` returns what was fetched for that layer (waiting for a fetch in
  flight) and forgets it, or None: never started, failed, or older than ``ttl_s``. A
  failure is only logged: the layer's own Prepare fetches again and reports the error
  with its proper reason. Nothing here is trusted more than a fresh fetch: Prepare
  verifies the TOC against its digest label either way.
* At most ``max_entries`` results are kept (the oldest are dropped); ``aclose`` cancels
  every fetch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A layer's end as fetched ahead: blob size, last bytes, and the TOC JSON when the
    end is an eStargz footer whose TOC could be read (else None)."""

    size: int
    tail: bytes
    toc: bytes | None


FetchAhead = Callable[[str, str], Awaitable[Fetched]]


class TocLookahead:
    """See the module docstring. ``fetch(ref, digest)`` does the fetching."""

    def __init__(self, fetch: FetchAhead, *, concurrency: int = 4, ttl_s: float = 120.0,
                 max_entries: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, asyncio.Task[Fetched]]] = (
            OrderedDict())

    def start(self, ref: str, digests: Sequence[str]) -> None:
        """Fetch the ends of ``digests`` of ``ref`` in the background."""
        now = self._clock()
        for digest in digests:
            key = (ref, digest)
            if key in self._entries:
                continue
            task = asyncio.get_running_loop().create_task(self._one(ref, digest))
            task.add_done_callback(_consume)
            self._entries[key] = (now, task)
        while len(self._entries) > self._max:
            _, (_, task) = self._entries.popitem(last=False)
            task.cancel()

    async def take(self, ref: str, digest: str) -> Fetched | None:
        """The fetched end of ``digest`` (see the module docstring), or None."""
        entry = self._entries.pop((ref, digest), None)
        if entry is None:
            return None
        started, task = entry
        if self._clock() - started > self._ttl:
            task.cancel()
            return None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return None
            raise  # the caller was cancelled; the fetch goes on for nobody
        except Exception:
            return None

    async def aclose(self) -> None:
        """Cancel every fetch and forget everything."""
        tasks = [task for _, task in self._entries.values()]
        self._entries.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, ref: str, digest: str) -> Fetched:
        async with self._slots:
            try:
                return await self._fetch(ref, digest)
            except Exception as exc:
                log.debug("look-ahead of %s in %s failed: %s", digest, ref, exc)
                raise


def _consume(task: asyncio.Task[Fetched]) -> None:
    if not task.cancelled():
        task.exception()  # a failure nobody takes is not "never retrieved"
