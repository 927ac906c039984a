"""bench.stats and bench.report: medians, percentiles, ratios, targets, table, JSON."""

from __future__ import annotations

import json

import pytest

from bench import report, stats
from bench.stats import Key, Sample


def test_median_and_percentile() -> None:
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([1.0, 2.0, 3.0, 4.0]) == 2.5
    values = [float(x) for x in range(1, 101)]
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile(values, 0) == 1.0 and stats.percentile(values, 100) == 100.0
    assert stats.percentile([7.0], 99) == 7.0


def test_statistics_refuse_bad_input() -> None:
    with pytest.raises(ValueError):
        stats.median([])
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_ratio_handles_missing_and_zero() -> None:
    assert stats.ratio(1.0, 4.0) == 0.25
    assert stats.ratio(None, 1.0) is None
    assert stats.ratio(1.0, None) is None
    assert stats.ratio(1.0, 0.0) is None


def test_latency_metrics() -> None:
    m = stats.latency_metrics([0.01] * 10, wall_s=0.5, ops_per_item=4)
    assert m["p50_s"] == pytest.approx(0.01)
    assert m["ops_per_s"] == pytest.approx(80.0)
    assert stats.latency_metrics([], 1.0) == {}


def _samples() -> list[Sample]:
    hello = Key("cold", "python", "hello", "total_s")
    share = Key("cold", "python", "hello", "registry_share")
    out = []
    for rep, (eager, lazy) in enumerate([(10.0, 1.0), (12.0, 3.0), (11.0, 2.0)]):
        out += [Sample(hello, "overlayfs", rep, eager), Sample(hello, "lazysnap", rep, lazy),
                Sample(share, "overlayfs", rep, 1.0), Sample(share, "lazysnap", rep, 0.2)]
    return out


def test_summarize_takes_medians_per_variant() -> None:
    summary = stats.summarize(_samples())
    key = Key("cold", "python", "hello", "total_s")
    assert summary.get(key, "overlayfs") == 11.0
    assert summary.get(key, "lazysnap") == 2.0
    assert summary.counts[key]["lazysnap"] == 3
    assert summary.ordered()[0] == key


def test_targets_are_evaluated_as_ratios_or_values() -> None:
    verdicts = report.evaluate(stats.summarize(_samples()))
    by_metric = {(v.target.key.metric, v.variant): v for v in verdicts}
    ratio_verdict = by_metric[("total_s", "lazysnap")]
    assert ratio_verdict.value == pytest.approx(2.0 / 11.0)
    assert ratio_verdict.passed is True and ratio_verdict.word == "PASS"
    share_verdict = by_metric[("registry_share", "lazysnap")]
    assert share_verdict.passed is False  # 20 % > 10 %
    # targets are about the challengers: the baseline is never judged
    assert ("registry_share", "overlayfs") not in by_metric
    assert ("total_s", "overlayfs") not in by_metric


def test_a_target_with_no_measurement_is_not_reported() -> None:
    assert report.evaluate(stats.Summary()) == []


def test_ge_target() -> None:
    key = Key("seqread", "data", "cold", "link_share")
    target = report.Target(key, "ge", 0.8, against="")
    summary = stats.summarize([Sample(key, "lazysnap", 0, 0.9), Sample(key, "other", 0, 0.5)])
    words = {v.variant: v.word for v in report.evaluate(summary, [target])}
    assert words == {"lazysnap": "PASS", "other": "FAIL"}
    assert target.text == ">= 80.0 %"


@pytest.mark.parametrize(("metric", "value", "text"), [
    ("total_s", 0.0123, "12.3 ms"), ("total_s", 2.5, "2.50 s"), ("seconds", 0.5, "500.0 ms"),
    ("registry_share", 0.051, "5.1 %"), ("registry_bytes", 3 << 20, "3.0 MiB"),
    ("total_mib", 40.25, "40.2 MiB"), ("mib_per_s", 11.94, "11.9 MiB/s"),
    ("iops", 1234.4, "1,234/s"), ("ops_per_s", 99.6, "100/s"), ("entries", 10241, "10241"),
    ("total_s", None, "-"),
])
def test_format_value(metric: str, value: float | None, text: str) -> None:
    assert report.format_value(metric, value) == text


def test_table_has_a_row_per_key_with_ratios_and_verdicts() -> None:
    summary = stats.summarize(_samples())
    text = report.table(summary, ["overlayfs", "lazysnap"], report.evaluate(summary))
    lines = text.splitlines()
    assert lines[0].startswith("| figure | image | case | metric | overlayfs | lazysnap |")
    assert "lazysnap/overlayfs" in lines[0]
    assert len(lines) == 2 + 2
    total = next(line for line in lines if "total_s" in line)
    assert "11.00 s" in total and "2.00 s" in total and "0.18x" in total
    assert "<= 0.2x overlayfs" in total and "lazysnap 0.18x PASS" in total
    share = next(line for line in lines if "registry_share" in line)
    assert "<= 10.0 %" in share and "lazysnap 20.0 % FAIL" in share


def test_document_is_json_with_samples_summary_and_targets() -> None:
    samples = _samples()
    summary = stats.summarize(samples)
    doc = report.document(samples, summary, report.evaluate(summary), {"reps": 3})
    again = json.loads(report.dump(doc))
    assert again["meta"] == {"reps": 3}
    assert len(again["samples"]) == len(samples)
    row = again["summary"][0]
    assert row["medians"] == {"overlayfs": 11.0, "lazysnap": 2.0}
    assert row["ratios_to_overlayfs"]["lazysnap"] == pytest.approx(2.0 / 11.0)
    assert {t["verdict"] for t in again["targets"]} <= {"PASS", "FAIL", "n/a"}
