"""Smoke test of ``python -m bench``: it runs end to end on the tiny image with shaping off.

Only that the benchmark works is checked (every figure produced samples for every variant,
the table and the JSON are written); the measured numbers and the targets are never
asserted: they depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
VARIANTS = {"overlayfs", "lazysnap", "lazysnap-shared"}
FIGURES = {"cold", "seqread", "randread", "walk", "api", "memory", "scale"}


def test_bench_runs_end_to_end_on_the_tiny_image(
    e2e_prerequisites: None, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--images", "tiny", "--no-shaping", "--reps", "1",
         "--api-cycles", "10", "--optimized", "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-6000:]}"
    assert result.stdout.startswith("| figure | image | case | metric | overlayfs |")
    doc = json.loads(out.read_text())
    seen = {(s["figure"], s["variant"]) for s in doc["samples"]}
    for figure in FIGURES - {"memory"}:
        for variant in VARIANTS:
            assert (figure, variant) in seen, f"no {figure} sample for {variant}"
    assert {("memory", "lazysnap"), ("memory", "lazysnap-shared")} <= seen
    assert doc["meta"]["link"] is None and doc["meta"]["variants"] == sorted(
        VARIANTS, key=["overlayfs", "lazysnap", "lazysnap-shared"].index)
    assert "link_measured" in doc["meta"]
    cold = [s for s in doc["samples"] if s["figure"] == "cold" and s["metric"] == "run_s"]
    assert all(s["value"] > 0 for s in cold)
    # The image optimised for the workload: cold start only, never checked against targets.
    assert {s["figure"] for s in doc["samples"] if s["variant"] == "lazysnap-opt"} == {"cold"}
    assert "opt-cat" in doc["meta"]["image_sizes"]["tiny"]
    assert all(t["variant"] != "lazysnap-opt" for t in doc["targets"])
    assert "lazysnap-opt (optimised image)" in result.stdout.splitlines()[0]
