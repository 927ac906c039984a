"""A short coverage-guided run of every fuzz target, and checks of the custom mutators.

Each target runs as ``python -m tests.fuzz run TARGET --runs N --seconds S`` in its own
process, two at a time (this suite's machines have two cores), with libFuzzer's per-input
limits (2 s, 1024 MB RSS): a crash, a hang or an RSS-limit breach fails the target's
test, with the finding's traceback and input in the message. The whole module stays
within about two minutes; ``SMOKE_SECONDS`` caps a slow target so that it cannot take
longer. atheris is a development dependency: without it these tests fail, never skip.
"""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz import mutators, seeds
from tests.fuzz.__main__ import TARGET_NAMES
from tests.fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[2]
SMOKE_RUNS = 20_000
SMOKE_SECONDS = 30
PARALLEL = 2


def _run(target: str, crashes: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tests.fuzz", "run", target, "--runs", str(SMOKE_RUNS),
           "--seconds", str(SMOKE_SECONDS), "--crashes", str(crashes), "--no-keep"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=SMOKE_SECONDS + 120)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            result["output"] = proc.stdout[-6000:]
            return result
    return {"kind": "error", "executed": 0, "output": proc.stdout[-3000:] + proc.stderr[-3000:]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    try:
        importlib.import_module("atheris")
    except ImportError as exc:
        pytest.fail(f"atheris is not installed ({exc}); `pip install -e '.[dev]'` installs it")
    base = tmp_path_factory.mktemp("fuzz-smoke")
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        results = pool.map(lambda t: _run(t, base / t), TARGET_NAMES)
        return dict(zip(TARGET_NAMES, results, strict=True))


def test_atheris_is_installed() -> None:
    importlib.import_module("atheris")


def test_every_target_is_listed() -> None:
    assert set(TARGET_NAMES) == set(TARGETS)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGET_NAMES)
def test_short_fuzz_run_finds_nothing(target: str, smoke: dict[str, dict[str, Any]]) -> None:
    result = smoke[target]
    assert result["kind"] == "ok", f"{target}: {result['kind']}\n{result['output']}"
    assert result["executed"] >= min(SMOKE_RUNS, 100), result["output"]


def _flip(data: bytes, max_size: int) -> bytes:
    """A stand-in for ``atheris.Mutate``: flips one bit."""
    out = bytearray(data[:max_size])
    if out:
        out[len(out) // 3] ^= 0x10
    return bytes(out)


@pytest.mark.parametrize("target", sorted(mutators.MUTATORS))
def test_mutators_stay_within_max_size_and_never_raise(target: str) -> None:
    mutate = mutators.MUTATORS[target]
    limit = TARGETS[target].max_len
    inputs = [*seeds.build(target), b"", b"\x1f\x8b", bytes(100)]
    rng = random.Random(0)
    for i in range(300):
        data = inputs[i % len(inputs)]
        out = mutate(data, limit, rng.getrandbits(32), _flip)
        assert isinstance(out, bytes) and len(out) <= limit


def test_tar_checksum_fixing_always_moves_forward() -> None:
    """A size field ``int()`` reads as negative once sent the mutator into an endless loop."""
    header = bytearray(mutators.tar_header(b"image/image.boot", 0))
    header[124:136] = b"-0001520\0   "
    stream = bytes(header) * 3 + bytes(1024)
    assert len(mutators.fix_tar_checksums(stream)) == len(stream)
