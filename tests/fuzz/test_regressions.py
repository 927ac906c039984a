"""Every saved fuzzing finding and every seed, replayed through its target under the bounds.

The contract of lazysnap's parsers of untrusted bytes: any input parses or raises
FormatError, within 2 s of CPU (``resource.getrusage``, no wall-clock timing) and with
Python allocations peaking under 64 MiB (``tracemalloc``). The inputs are the files under
``tests/fuzz/regressions/<target>/`` (each one a finding of the fuzzer, named by its sha1)
and the seed corpora of ``tests/fuzz/seeds.py``. ``replay.run_one`` guards each run
(a CPU-time alarm, an address-space cap), so a regression that hangs or explodes fails
instead of taking the test run down.

``KNOWN_UNFIXED`` lists findings reported but not fixed yet: they are strict xfails, so
the suite stays green until the fix lands and then fails until the entry is removed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz import replay, seeds
from tests.fuzz.targets import TARGETS

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
CPU_BOUND_SECONDS = 2.0
MEMORY_BOUND_BYTES = 64 << 20
_SHA1 = re.compile(r"[0-9a-f]{40}")

KNOWN_UNFIXED: dict[str, str] = {}
"""sha1 of a regression input -> what is wrong (see docs/fuzzing.md); xfail until fixed."""


def _regressions() -> Iterator[tuple[str, Path]]:
    for target in TARGETS:
        directory = REGRESSIONS / target
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                if _SHA1.fullmatch(path.name):
                    yield target, path


def _params() -> list[object]:
    params: list[object] = []
    for target, path in _regressions():
        reason = KNOWN_UNFIXED.get(path.name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(target, path, id=f"{target}/{path.name[:12]}", marks=marks))
    return params


def _check(target: str, data: bytes, what: str) -> None:
    """Two runs: CPU time measured without tracemalloc (which slows allocation down
    severalfold), then the allocation peak."""
    timed = replay.run_one(target, data, trace_memory=False)
    assert timed.ok, f"{what}: {timed.signature}\n{timed.traceback}"
    assert timed.cpu_seconds <= CPU_BOUND_SECONDS, (
        f"{what}: {timed.cpu_seconds:.2f} s of CPU, bound {CPU_BOUND_SECONDS} s")
    traced = replay.run_one(target, data)
    assert traced.ok, f"{what}: {traced.signature}\n{traced.traceback}"
    assert traced.peak_bytes <= MEMORY_BOUND_BYTES, (
        f"{what}: allocations peaked at {traced.peak_bytes / (1 << 20):.1f} MiB, bound "
        f"{MEMORY_BOUND_BYTES >> 20} MiB")


def test_regressions_are_named_by_content_and_target() -> None:
    """Directories are target names; files are named by the sha1 of their content."""
    if not REGRESSIONS.is_dir():
        return
    for directory in REGRESSIONS.iterdir():
        if not directory.is_dir():
            continue
        assert directory.name in TARGETS, f"regressions/{directory.name}: not a target"
        for path in directory.iterdir():
            if _SHA1.fullmatch(path.name):
                assert hashlib.sha1(path.read_bytes()).hexdigest() == path.name, path


def test_known_unfixed_names_existing_regressions() -> None:
    names = {path.name for _, path in _regressions()}
    assert set(KNOWN_UNFIXED) <= names, set(KNOWN_UNFIXED) - names


@pytest.mark.parametrize(("target", "path"), _params())
def test_regression(target: str, path: Path) -> None:
    _check(target, path.read_bytes(), f"regressions/{target}/{path.name}")


@pytest.mark.parametrize("target", list(TARGETS))
def test_seeds(target: str) -> None:
    built = seeds.build(target)
    assert built, f"no seeds for {target}"
    for seed in built:
        _check(target, seed, f"{target} seed {hashlib.sha1(seed).hexdigest()}")
