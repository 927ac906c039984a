"""Memory bounds in tests: Python's own allocations, measured with ``tracemalloc``."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager

PEAK = 64 << 20
"""The extra memory a hostile input may cost a parser (issue: bounded parsing)."""


@contextmanager
def peak_under(limit: int = PEAK) -> Iterator[None]:
    """Fail unless the Python allocations inside the block peak below ``limit`` bytes
    (exceptions raised in the block propagate, and are then not measured)."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"
