"""Platform normalisation and index entry selection (snapshotter.registry.platforms)."""

from __future__ import annotations

from typing import Any

import pytest

from snapshotter.errdefs import FormatError, InvalidArgument, NotFound
from snapshotter.registry.platforms import Platform, current_platform, normalize, select_manifest


def _entry(digest: str, os: str, arch: str, variant: str | None = None) -> dict[str, Any]:
    platform: dict[str, str] = {"os": os, "architecture": arch}
    if variant is not None:
        platform["variant"] = variant
    return {"digest": digest, "mediaType": "m", "size": 1, "platform": platform}


INDEX = {
    "manifests": [
        {"digest": "attestation", "annotations": {}},
        _entry("amd", "linux", "amd64"),
        _entry("armv6", "linux", "arm", "v6"),
        _entry("armv7", "linux", "arm", "v7"),
        _entry("arm64", "linux", "arm64", "v8"),
        _entry("win", "windows", "amd64"),
    ]
}


@pytest.mark.parametrize(
    ("want", "digest"),
    [
        ("linux/amd64", "amd"),
        ("linux/x86_64", "amd"),
        ("linux/arm64", "arm64"),
        ("linux/aarch64", "arm64"),
        ("linux/arm64/v8", "arm64"),
        ("linux/arm", "armv7"),
        ("linux/arm/v6", "armv6"),
        ("windows/amd64", "win"),
    ],
)
def test_select_manifest(want: str, digest: str) -> None:
    assert select_manifest(INDEX, Platform.parse(want))["digest"] == digest


def test_select_manifest_failures() -> None:
    with pytest.raises(NotFound):
        select_manifest(INDEX, Platform.parse("linux/s390x"))
    with pytest.raises(FormatError):
        select_manifest({"manifests": "x"}, Platform.parse("linux/amd64"))
    with pytest.raises(FormatError):
        select_manifest({"manifests": [{"platform": {}}]}, Platform.parse("linux/amd64"))
    bad_platform = {"manifests": [{"digest": "d", "platform": {"os": 1, "architecture": "x"}}]}
    with pytest.raises(FormatError):
        select_manifest(bad_platform, Platform.parse("linux/amd64"))


def test_platform_parse_and_str() -> None:
    assert str(Platform.parse("Linux/AMD64")) == "linux/amd64"
    assert str(Platform.parse("linux/armv7l")) == "linux/arm/v7"
    assert normalize("linux", "aarch64") == Platform("linux", "arm64")
    for bad in ("linux", "linux/", "a/b/c/d", ""):
        with pytest.raises(InvalidArgument):
            Platform.parse(bad)


def test_current_platform_is_linux() -> None:
    here = current_platform()
    assert here.os == "linux"
    assert here.architecture not in ("x86_64", "aarch64")
