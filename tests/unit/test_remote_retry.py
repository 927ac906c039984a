"""Classified retries with an injectable clock (snapshotter.registry.retry)."""

from __future__ import annotations

import asyncio

import pytest

from snapshotter.errdefs import (
    BlobNotFound,
    RangeNotSatisfiable,
    RegistryAuthError,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
)
from snapshotter.registry.retry import (
    RegistryThrottled,
    RetryPolicy,
    error_for_status,
    is_retryable,
)


class FakeTime:
    """A clock that only moves when the policy sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def policy(t: FakeTime, **kw: float) -> RetryPolicy:
    params: dict[str, float] = {"max_attempts": 5, "deadline": 60.0, "base_delay": 1.0}
    params.update(kw)
    return RetryPolicy(
        max_attempts=int(params["max_attempts"]),
        deadline=params["deadline"],
        base_delay=params["base_delay"],
        max_delay=params.get("max_delay", 8.0),
        clock=t.clock,
        sleep=t.sleep,
        random=lambda: 0.5,
    )


class Flaky:
    """Fails with the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (408, RegistryTimeout),
        (429, RegistryThrottled),
        (500, RegistryUnavailable),
        (502, RegistryUnavailable),
        (503, RegistryThrottled),
        (504, RegistryUnavailable),
        (401, RegistryAuthError),
        (403, RegistryAuthError),
        (404, BlobNotFound),
        (416, RangeNotSatisfiable),
        (400, RegistryError),
        (405, RegistryError),
    ],
)
def test_error_for_status(status: int, cls: type[RegistryError]) -> None:
    error = error_for_status(status, "GET x")
    assert type(error) is cls
    assert f"HTTP {status}" in str(error)
    retryable = status in (408, 429) or status >= 500
    assert is_retryable(error) is retryable


async def test_retries_transient_errors_then_succeeds() -> None:
    t = FakeTime()
    op = Flaky(RegistryUnavailable("reset"), RegistryTimeout("slow"), error_for_status(502, "x"))
    seen: list[RegistryError] = []
    assert await policy(t).run(op, what="op", on_retry=seen.append) == "ok"
    assert op.calls == 4
    assert len(seen) == 3
    # full jitter with random() = 0.5: half of 1, 2, 4 seconds
    assert t.sleeps == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(
    "error",
    [
        RegistryAuthError("no"),
        BlobNotFound("gone"),
        RangeNotSatisfiable("past"),
        RegistryError("400"),
    ],
)
async def test_never_retries_permanent_errors(error: RegistryError) -> None:
    t = FakeTime()
    op = Flaky(error)
    with pytest.raises(type(error)) as info:
        await policy(t).run(op, what="op")
    assert info.value is error
    assert op.calls == 1 and t.sleeps == []


async def test_gives_up_after_max_attempts_with_last_cause() -> None:
    t = FakeTime()
    op = Flaky(*(RegistryUnavailable(f"boom {i}") for i in range(10)))
    with pytest.raises(RegistryUnavailable) as info:
        await policy(t, max_attempts=3).run(op, what="GET blob")
    assert op.calls == 3
    assert "GET blob" in str(info.value) and "boom 2" in str(info.value)
    assert not isinstance(info.value, RegistryTimeout)
    assert isinstance(info.value.__cause__, RegistryUnavailable)


async def test_gives_up_with_timeout_class_when_last_cause_was_a_timeout() -> None:
    t = FakeTime()
    op = Flaky(RegistryUnavailable("a"), RegistryTimeout("b"))
    with pytest.raises(RegistryTimeout):
        await policy(t, max_attempts=2).run(op, what="op")


async def test_deadline_stops_retrying() -> None:
    t = FakeTime()
    op = Flaky(*(RegistryUnavailable("down") for _ in range(100)))
    with pytest.raises(RegistryTimeout) as info:
        await policy(t, max_attempts=100, deadline=5.0).run(op, what="op")
    assert "deadline" in str(info.value) and "down" in str(info.value)
    assert t.now - 1000.0 < 5.0  # never slept past the deadline
    assert sum(t.sleeps) < 5.0


async def test_deadline_cancels_a_running_attempt() -> None:
    async def hang() -> str:
        await asyncio.Event().wait()
        return "never"

    with pytest.raises(RegistryTimeout) as info:
        await RetryPolicy(max_attempts=3, deadline=0.05).run(hang, what="hanging op")
    assert "hanging op" in str(info.value)


async def test_bare_timeout_error_is_retryable() -> None:
    t = FakeTime()
    op = Flaky(TimeoutError("socket"))
    assert await policy(t).run(op, what="op") == "ok"
    assert op.calls == 2


def test_backoff_bounds_and_retry_after() -> None:
    t = FakeTime()
    p = RetryPolicy(base_delay=0.1, max_delay=2.0, random=lambda: 0.999999, clock=t.clock)
    for retry in range(20):
        assert 0 <= p.backoff(retry) <= min(2.0, 0.1 * 2**retry)
    throttled = error_for_status(429, "x", retry_after="1.5")
    zero = RetryPolicy(random=lambda: 0.0, max_delay=5.0)
    assert zero.backoff(0, throttled) == 1.5
    assert zero.backoff(0, error_for_status(503, "x", retry_after="999")) == 5.0
    assert zero.backoff(0, error_for_status(503, "x", retry_after="Wed, 21 Oct 2015")) == 0.0


def test_policy_validates() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(deadline=0)
