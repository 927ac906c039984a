"""The issue's targets, their evaluation, and the printed table and JSON document.

Targets are only *reported* (PASS/FAIL next to each figure); nothing asserts them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .stats import Key, Sample, Summary, ratio

BASELINE = "overlayfs"


@dataclass(frozen=True)
class Target:
    """``value op limit`` for every variant it applies to; ``against`` a baseline variant
    turns the value into the ratio variant / baseline."""

    key: Key
    op: str  # "le" or "ge"
    limit: float
    against: str = BASELINE
    variants: tuple[str, ...] = ()  # empty: every variant but the baseline

    @property
    def text(self) -> str:
        """The target as shown in the table, e.g. ``<= 0.2x overlayfs``."""
        sign = "<=" if self.op == "le" else ">="
        if self.against:
            return f"{sign} {self.limit:g}x {self.against}"
        return f"{sign} {format_value(self.key.metric, self.limit)}"


@dataclass(frozen=True)
class Verdict:
    """One target checked for one variant."""

    target: Target
    variant: str
    value: float | None  # None: not measured in this run

    @property
    def passed(self) -> bool | None:
        """None when the value was not measured."""
        if self.value is None:
            return None
        if self.target.op == "le":
            return self.value <= self.target.limit
        return self.value >= self.target.limit

    @property
    def word(self) -> str:
        """PASS, FAIL or n/a."""
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def _k(figure: str, image: str, case: str, metric: str) -> Key:
    return Key(figure, image, case, metric)


TARGETS: tuple[Target, ...] = (
    Target(_k("cold", "python", "hello", "total_s"), "le", 0.2),
    Target(_k("cold", "python", "hello", "registry_share"), "le", 0.10, against=""),
    Target(_k("cold", "python", "imports", "total_s"), "le", 0.35),
    Target(_k("cold", "data", "md5sum", "total_s"), "le", 0.9),
    Target(_k("seqread", "data", "warm", "mib_per_s"), "ge", 0.5),
    Target(_k("seqread", "data", "cold", "link_share"), "ge", 0.8, against=""),
    Target(_k("walk", "data", "second", "seconds"), "le", 1.5),
    Target(_k("walk", "data", "first", "seconds"), "le", 4.0),
    Target(_k("api", "-", "1 client", "p50_s"), "le", 1.5),
    Target(_k("api", "-", "16 clients", "p50_s"), "le", 1.5),
    Target(_k("memory", "layers", "50 layers", "daemon_max_mib"), "le", 40.0, against="",
           variants=("lazysnap",)),
    Target(_k("memory", "layers", "50 layers", "total_mib"), "le", 150.0, against="",
           variants=("lazysnap-shared",)),
)


def evaluate(summary: Summary, targets: Sequence[Target] = TARGETS,
             untargeted: Collection[str] = ()) -> list[Verdict]:
    """Every target against every variant it applies to that the summary has; a target
    with no explicit ``variants`` skips the baseline and the ``untargeted`` variants (such
    as the optimised image, which the issue's targets are not about)."""
    out: list[Verdict] = []
    for target in targets:
        measured = summary.medians.get(target.key, {})
        names = target.variants or tuple(v for v in measured
                                         if v != BASELINE and v not in untargeted)
        for variant in names:
            value = measured.get(variant)
            if target.against:
                value = ratio(value, measured.get(target.against))
            if value is None and variant not in measured:
                continue
            out.append(Verdict(target, variant, value))
    return out


def format_value(metric: str, value: float | None) -> str:
    """A human-readable number for ``metric`` (unit from its suffix)."""
    if value is None:
        return "-"
    if (metric.endswith("_s") and not metric.endswith("per_s")) or metric == "seconds":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if metric.endswith("_share"):
        return f"{value * 100:.1f} %"
    if metric.endswith("_bytes"):
        return f"{value / (1 << 20):.1f} MiB"
    if metric.endswith("_mib"):
        return f"{value:.1f} MiB"
    if metric == "mib_per_s":
        return f"{value:.1f} MiB/s"
    if metric.endswith("_mbit"):
        return f"{value:.1f} Mbit/s"
    if metric.endswith("per_s") or metric == "iops":
        return f"{value:,.0f}/s"
    return f"{value:g}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _verdict_text(v: Verdict) -> str:
    shown = (_fmt_ratio(v.value) if v.target.against
             else format_value(v.target.key.metric, v.value))
    return f"{v.variant} {shown} {v.word}"


def table(summary: Summary, variants: Sequence[str], verdicts: Sequence[Verdict],
          labels: Mapping[str, str] | None = None) -> str:
    """A Markdown table: one row per figure/image/case/metric, a column per variant, the
    ratio of each other variant to overlayfs, and the target with its verdicts. Column
    headers show ``labels[variant]`` where given, else the variant's name."""
    shown = {v: (labels or {}).get(v, v) for v in variants}
    others = [v for v in variants if v != BASELINE]
    header = ["figure", "image", "case", "metric", *(shown[v] for v in variants),
              *(f"{shown[v]}/{BASELINE}" for v in others if BASELINE in variants),
              "target", "verdict"]
    by_key: dict[Key, list[Verdict]] = {}
    for verdict in verdicts:
        by_key.setdefault(verdict.target.key, []).append(verdict)
    rows = [header, ["---"] * len(header)]
    for key in summary.ordered():
        med = summary.medians[key]
        row = [key.figure, key.image, key.case, key.metric,
               *(format_value(key.metric, med.get(v)) for v in variants)]
        if BASELINE in variants:
            row += [_fmt_ratio(ratio(med.get(v), med.get(BASELINE))) for v in others]
        vs = by_key.get(key, [])
        row.append(vs[0].target.text if vs else "")
        row.append(", ".join(_verdict_text(v) for v in vs))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def document(samples: Sequence[Sample], summary: Summary, verdicts: Sequence[Verdict],
             meta: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document: run metadata, raw samples, medians with ratios, verdicts."""
    rows = []
    for key in summary.ordered():
        med = summary.medians[key]
        rows.append({"figure": key.figure, "image": key.image, "case": key.case,
                     "metric": key.metric, "medians": med, "reps": summary.counts[key],
                     "ratios_to_overlayfs": {v: ratio(x, med.get(BASELINE))
                                             for v, x in med.items() if v != BASELINE}})
    return {"meta": dict(meta), "summary": rows,
            "targets": [{"figure": v.target.key.figure, "image": v.target.key.image,
                         "case": v.target.key.case, "metric": v.target.key.metric,
                         "target": v.target.text, "variant": v.variant, "value": v.value,
                         "verdict": v.word} for v in verdicts],
            "samples": [s.to_json() for s in samples]}


def dump(doc: Mapping[str, Any]) -> str:
    """``doc`` as indented JSON."""
    return json.dumps(doc, indent=1, sort_keys=False)
