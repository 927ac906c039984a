"""The bench's columns: which variants run, which tag each pulls (no system needed)."""

from __future__ import annotations

from bench import cli
from bench.env import LAZYSNAP, LAZYSNAP_NYDUS, LAZYSNAP_SHARED, OVERLAYFS


def _names(argv: list[str]) -> list[str]:
    return [v.name for v in cli.variants(cli.parse_args(argv))]


def test_each_variant_pulls_its_tag() -> None:
    assert (OVERLAYFS.tag, LAZYSNAP.tag, LAZYSNAP_SHARED.tag) == ("gzip", "esgz", "esgz")
    assert LAZYSNAP_NYDUS.tag == "nydus" and LAZYSNAP_NYDUS.mode == "dedicated"
    assert LAZYSNAP_NYDUS.cold_only and not LAZYSNAP.cold_only


def test_nydus_joins_the_cold_figure_unless_skipped() -> None:
    assert _names([]) == ["overlayfs", "lazysnap", "lazysnap-shared", "lazysnap-nydus"]
    assert _names(["--no-nydus"]) == ["overlayfs", "lazysnap", "lazysnap-shared"]
    assert _names(["--only", "api,walk"]) == ["overlayfs", "lazysnap", "lazysnap-shared"]
    assert _names(["--only", "cold", "--modes", "shared", "--no-overlayfs"]) == [
        "lazysnap-shared", "lazysnap-nydus"]
