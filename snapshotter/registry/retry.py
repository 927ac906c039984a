"""Classified, bounded, jittered retries with an injectable clock and sleep.

Classification is by error type only (never by message):

* retried: ``RegistryUnavailable`` and its subclasses, i.e. connection errors, timeouts,
  HTTP 408, 429 and 5xx (see :func:`error_for_status`);
* not retried: every other error (401/403 -> ``RegistryAuthError``, 404 -> ``BlobNotFound``,
  416 -> ``RangeNotSatisfiable``, other 4xx -> ``RegistryError``, digest mismatches, bugs).

Backoff is "full jitter": before retry *n* (0-based) the policy sleeps a uniform random time
in ``[0, min(max_delay, base_delay * 2**n))``, at least a server's ``Retry-After`` (capped
at ``max_delay``). An operation gets at most ``max_attempts`` attempts and ``deadline``
seconds overall; a running attempt is cancelled when the deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from snapshotter.errdefs import (
    BlobNotFound,
    RangeNotSatisfiable,
    RegistryAuthError,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RegistryThrottled(RegistryUnavailable):
    """429 or 503, possibly with a ``Retry-After`` delay in seconds (None if absent)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def is_retryable(exc: BaseException) -> bool:
    """True for the transient failures worth another attempt (``RegistryUnavailable``)."""
    return isinstance(exc, RegistryUnavailable)


def error_for_status(status: int, what: str, retry_after: str | None = None) -> RegistryError:
    """The typed error for a failed HTTP status; ``what`` names the call (no credentials).

    ``retry_after`` is the raw ``Retry-After`` header, honoured for 429 and 503 when it is
    a number of seconds.
    """
    message = f"{what}: HTTP {status}"
    if status == 408:
        return RegistryTimeout(message)
    if status in (429, 503):
        return RegistryThrottled(message, _parse_retry_after(retry_after))
    if status >= 500:
        return RegistryUnavailable(message)
    if status in (401, 403):
        return RegistryAuthError(message)
    if status == 404:
        return BlobNotFound(message)
    if status == 416:
        return RangeNotSatisfiable(message)
    return RegistryError(message)


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: rare from registries, and the backoff still applies
    return seconds if 0 <= seconds < 86400 else None


@dataclass(frozen=True)
class RetryPolicy:
    """How one registry operation is retried; see the module docstring.

    ``clock`` (seconds, monotonic), ``sleep`` and ``random`` (uniform in [0, 1)) are
    injectable so tests run instantly and deterministically.
    """

    max_attempts: int = 5
    deadline: float = 60.0
    base_delay: float = 0.1
    max_delay: float = 5.0
    clock: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep
    random: Callable[[], float] = _random.random

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.deadline <= 0 or self.base_delay < 0:
            raise ValueError("RetryPolicy needs max_attempts >= 1, deadline > 0, delays >= 0")

    def backoff(self, retry: int, error: BaseException | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based) after ``error``."""
        ceiling = min(self.max_delay, self.base_delay * (2.0**retry))
        delay = self.random() * ceiling
        if isinstance(error, RegistryThrottled) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, self.max_delay))
        return delay

    async def run(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        what: str,
        on_retry: Callable[[RegistryError], None] | None = None,
    ) -> T:
        """Run ``operation`` until it succeeds, fails for good, or the budget is spent.

        Non-retryable errors propagate unchanged on the first occurrence. When attempts
        run out, raises ``RegistryUnavailable`` (``RegistryTimeout`` if the last failure
        was a timeout); when the deadline passes, ``RegistryTimeout``. Both name ``what``,
        the attempt count and the last cause, and chain it as ``__cause__``.
        ``on_retry`` is called with the error before each backoff sleep.
        """
        end = self.clock() + self.deadline
        last: RegistryError | None = None
        for attempt in range(self.max_attempts):
            remaining = end - self.clock()
            if remaining <= 0:
                raise _deadline_error(what, self.deadline, attempt, last)
            try:
                return await _bounded(operation, remaining)
            except _DeadlineHit:
                raise _deadline_error(what, self.deadline, attempt + 1, last) from last
            except RegistryError as exc:
                if not is_retryable(exc):
                    raise
                last = exc
            if attempt + 1 == self.max_attempts:
                break
            delay = self.backoff(attempt, last)
            if self.clock() + delay >= end:
                raise _deadline_error(what, self.deadline, attempt + 1, last) from last
            log.debug(
                "%s: attempt %d failed (%s); retrying in %.3fs", what, attempt + 1, last, delay
            )
            if on_retry is not None:
                on_retry(last)
            await self.sleep(delay)
        assert last is not None
        cls = RegistryTimeout if isinstance(last, RegistryTimeout) else RegistryUnavailable
        raise cls(f"{what}: gave up after {self.max_attempts} attempts: {last}") from last


class _DeadlineHit(Exception):
    """The overall deadline cancelled a running attempt."""


async def _bounded(operation: Callable[[], Awaitable[T]], seconds: float) -> T:
    """Await ``operation()`` for at most ``seconds``; a bare TimeoutError from the
    operation itself becomes a retryable ``RegistryTimeout``."""
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            return await operation()
    except TimeoutError as exc:
        if scope.expired():
            raise _DeadlineHit() from exc
        raise RegistryTimeout(f"timed out: {exc}") from exc


def _deadline_error(
    what: str, deadline: float, attempts: int, last: RegistryError | None
) -> RegistryTimeout:
    cause = f"; last error: {last}" if last is not None else ""
    return RegistryTimeout(
        f"{what}: deadline of {deadline:g}s passed after {attempts} attempt(s){cause}"
    )
