"""Pure statistics for the benchmark: medians, percentiles, ratios, and the summary of
raw samples into one median per (figure, image, case, variant, metric)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def median(values: Sequence[float]) -> float:
    """The median; ValueError for no values."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (0..100) with linear interpolation between closest ranks
    (numpy's default); ValueError for no values or ``pct`` out of range."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be in 0..100, got {pct}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


@dataclass(frozen=True, order=True)
class Key:
    """Which number: figure, image, case (workload or sub-measurement) and metric."""

    figure: str
    image: str
    case: str
    metric: str


@dataclass(frozen=True)
class Sample:
    """One measured value of one repetition."""

    key: Key
    variant: str
    rep: int
    value: float

    def to_json(self) -> dict[str, Any]:
        """A flat JSON object."""
        return {"figure": self.key.figure, "image": self.key.image, "case": self.key.case,
                "metric": self.key.metric, "variant": self.variant, "rep": self.rep,
                "value": self.value}


@dataclass
class Summary:
    """Medians by key and variant, with the samples they came from."""

    medians: dict[Key, dict[str, float]] = field(default_factory=dict)
    counts: dict[Key, dict[str, int]] = field(default_factory=dict)

    def get(self, key: Key, variant: str) -> float | None:
        """The median, or None when not measured."""
        return self.medians.get(key, {}).get(variant)

    def ordered(self) -> list[Key]:
        """Keys in the order they were first measured."""
        return list(self.medians)


def summarize(samples: Iterable[Sample]) -> Summary:
    """Group samples by key and variant and take medians (key order: first seen)."""
    groups: dict[Key, dict[str, list[float]]] = {}
    for s in samples:
        groups.setdefault(s.key, {}).setdefault(s.variant, []).append(s.value)
    out = Summary()
    for key, by_variant in groups.items():
        out.medians[key] = {v: median(vals) for v, vals in by_variant.items()}
        out.counts[key] = {v: len(vals) for v, vals in by_variant.items()}
    return out


def latency_metrics(latencies: Sequence[float], wall_s: float, ops_per_item: int = 1,
                    prefix: str = "") -> Mapping[str, float]:
    """p50, p99 (seconds) and operations per second of a closed-loop run."""
    if not latencies:
        return {}
    return {f"{prefix}p50_s": percentile(latencies, 50),
            f"{prefix}p99_s": percentile(latencies, 99),
            f"{prefix}ops_per_s": len(latencies) * ops_per_item / wall_s if wall_s else 0.0}
