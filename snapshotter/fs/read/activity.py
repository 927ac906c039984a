"""On-demand fetch activity, shared by every daemon of one snapshotter root.

The background fetch of a layer must never compete with a container that is waiting for
data: a cold start reads a few files with one round trip each, and a whole-layer fetch on
the same link and the same request slots makes every one of those round trips slower.
So the background fetch only runs while the machine's lazily mounted layers have been
*quiet* for a while: no on-demand fetch, no read-ahead and no new layer mounted, in any
daemon, for ``silence_s`` seconds. It pauses again at the next on-demand fetch.

Daemons are separate processes in dedicated mode, so "any daemon" is shared through one
file (``activity_file`` of the layer spec, ``<root>/activity``): ``note`` sets its
modification time (at most every ``TOUCH_INTERVAL_S``), and ``idle_for`` reads it. The file
carries no data; if it cannot be created or stat'ed (read-only root, removed directory)
the activity of this process alone is used, which only makes the gate less strict.

Clock: wall-clock seconds (``time.time``), because file modification times are wall-clock.
A clock step backwards makes the gate wait at most ``silence_s`` longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

TOUCH_INTERVAL_S = 0.25
"""Shortest interval between two updates of the activity file by one process."""


class Activity:
    """The last on-demand activity seen by this process or recorded in ``path``."""

    def __init__(
        self,
        path: str | None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.path = path
        self._clock = clock
        self._sleep = sleep
        self._last = 0.0
        self._touched = 0.0
        self._warned = False

    def note(self) -> None:
        """Record on-demand activity now (cheap: one ``utime`` per ``TOUCH_INTERVAL_S``)."""
        now = self._clock()
        self._last = now
        if self.path is None or now - self._touched < TOUCH_INTERVAL_S:
            return
        self._touched = now
        try:
            os.utime(self.path, (now, now))
        except FileNotFoundError:
            self._create(now)
        except OSError as exc:
            self._warn(exc)

    def idle_for(self) -> float:
        """Seconds since the last activity of any daemon sharing ``path`` (>= 0)."""
        last = self._last
        if self.path is not None:
            # No file yet, or unreadable: our own activity is all we know.
            with contextlib.suppress(OSError):
                last = max(last, os.stat(self.path).st_mtime)
        return max(0.0, self._clock() - last)

    async def wait_quiet(self, silence_s: float) -> None:
        """Return once nothing has been active for ``silence_s`` seconds (0: at once)."""
        while silence_s > 0:
            idle = self.idle_for()
            if idle >= silence_s:
                return
            await self._sleep(silence_s - idle)

    def _create(self, now: float) -> None:
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.utime(self.path, (now, now))
        except OSError as exc:
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("activity file %s not usable (%s); background fetch only sees "
                        "this daemon's reads", self.path, exc)
