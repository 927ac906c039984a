"""Run one input through a target outside libFuzzer: measured, guarded, classified.

``run_one`` is what the regression tests, ``python -m tests.fuzz repro`` and
``minimize`` use. It measures the CPU time the input took (``resource.getrusage``,
user + system, this thread) and, optionally, the peak of Python allocations
(``tracemalloc``, above what was allocated before), and guards the process meanwhile:
a CPU-time alarm (``ITIMER_PROF``) interrupts a runaway input with ``CpuGuardExceeded``, and a
temporarily lowered address-space limit (``RLIMIT_AS``) turns a memory bomb into a
``MemoryError`` instead of an exhausted machine. Both guards are far above the
contract's bounds; the bounds themselves are checked by the caller on the measurements.

``signature`` names a finding by exception type and innermost project frame, to tell
findings apart; ``minimize`` shrinks an input while its signature stays the same.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from tests.fuzz.targets import TARGETS

__all__ = ["CpuGuardExceeded", "Outcome", "minimize", "run_one", "signature"]

REPO = Path(__file__).resolve().parents[2]
CPU_GUARD_SECONDS = 20.0
"""``run_one`` interrupts an input after this much CPU time (the contract is 2 s)."""
MEMORY_GUARD_BYTES = 2 << 30
"""``run_one`` lets the address space grow by at most this much while an input runs."""


class CpuGuardExceeded(Exception):
    """Raised inside a target by the CPU-time alarm of ``run_one``."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one input did.

    ``error`` is None when the target returned (the parser accepted the input or raised
    FormatError, which the target catches). ``cpu_seconds`` is user + system time of
    the calling thread; ``peak_bytes`` the tracemalloc peak (0 when not traced).
    """

    target: str
    error: BaseException | None
    cpu_seconds: float
    peak_bytes: int
    traceback: str

    @property
    def ok(self) -> bool:
        """True when nothing but FormatError escaped (time and memory not considered)."""
        return self.error is None

    @property
    def signature(self) -> str | None:
        """``signature(error)``, or None when there is no error."""
        return None if self.error is None else signature(self.error)


def signature(exc: BaseException) -> str:
    """``"<Type> at <path>:<line> in <function>"`` of the innermost frame in ``snapshotter/``
    (or, when no project frame is involved, the innermost frame at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}snapshotter{os.sep}" in f.filename]
    candidates = ours or list(frames)
    where = "?"
    if candidates:
        chosen = candidates[-1]
        path = Path(chosen.filename)
        with contextlib.suppress(ValueError):
            path = path.relative_to(REPO)
        where = f"{path}:{chosen.lineno} in {chosen.name}"
    return f"{type(exc).__name__} at {where}"


def _cpu_seconds() -> float:
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _address_space() -> int:
    """Current virtual size of this process in bytes (0 if unknown)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _guards(cpu_seconds: float, memory_bytes: int) -> Iterator[None]:
    """CPU alarm and address-space limit around a block (main thread only; else none)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise CpuGuardExceeded(f"input ran for more than {cpu_seconds} s of CPU")

    old_handler = signal.signal(signal.SIGPROF, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    current = _address_space()
    limit = current + memory_bytes if current else resource.RLIM_INFINITY
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and limit != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_one(target: str, data: bytes, *, trace_memory: bool = True,
            cpu_guard: float = CPU_GUARD_SECONDS,
            memory_guard: int = MEMORY_GUARD_BYTES) -> Outcome:
    """Run ``data`` through ``target`` once; never raises for what the target does.

    The targets catch FormatError where the contract allows it, so any exception that
    reaches here (including ``CpuGuardExceeded`` and ``MemoryError`` from the guards) is
    a finding, returned in the outcome, as in the fuzzing worker. Raises KeyError for an
    unknown target.
    """
    fn = TARGETS[target].fn
    error: BaseException | None = None
    tb = ""
    was_tracing = tracemalloc.is_tracing()
    baseline = 0
    if trace_memory:
        if not was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
    start = _cpu_seconds()
    try:
        with _guards(cpu_guard, memory_guard):
            fn(data)
    except Exception as exc:
        error = exc
        tb = "".join(traceback.format_exception(exc))
    cpu = _cpu_seconds() - start
    peak = 0
    if trace_memory:
        peak = tracemalloc.get_traced_memory()[1] - baseline
        if not was_tracing:
            tracemalloc.stop()
    return Outcome(target, error, cpu, peak, tb)


def minimize(target: str, data: bytes, *, seconds: float = 60.0,
             log: Callable[[str], None] | None = None) -> bytes:
    """The shortest input found in ``seconds`` with the same signature as ``data``.

    Greedy delta debugging: removes ever smaller slices (halves down to single bytes)
    while the finding reproduces, then zeroes single bytes where that keeps it. Raises
    ValueError if ``data`` itself does not fail.
    """
    want = run_one(target, data, trace_memory=False).signature
    if want is None:
        raise ValueError("the input does not fail; nothing to minimise")
    deadline = time.monotonic() + seconds

    def same(candidate: bytes) -> bool:
        return run_one(target, candidate, trace_memory=False).signature == want

    best = data
    size = max(1, len(best) // 2)
    while size >= 1 and time.monotonic() < deadline:
        pos, shrunk = 0, False
        while pos < len(best) and time.monotonic() < deadline:
            candidate = best[:pos] + best[pos + size :]
            if candidate != best and same(candidate):
                best, shrunk = candidate, True
            else:
                pos += size
        if log is not None:
            log(f"slices of {size}: {len(best)} bytes")
        if not shrunk:
            size //= 2
    for pos in range(len(best)):
        if time.monotonic() >= deadline:
            break
        if best[pos] != 0:
            candidate = best[:pos] + b"\0" + best[pos + 1 :]
            if same(candidate):
                best = candidate
    return best
