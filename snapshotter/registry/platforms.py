"""Platforms (``os/architecture[/variant]``) and choosing a manifest from an image index.

Normalisation follows containerd's ``platforms`` package in spirit: ``x86_64`` is
``amd64``, ``aarch64`` is ``arm64`` (variant ``v8`` implied), ``armv7l`` is ``arm/v7``
(``arm`` alone implies ``v7``). Matching is exact after normalisation; the first matching
index entry wins.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from snapshotter.errdefs import FormatError, InvalidArgument, NotFound

_ARCH_ALIASES: Mapping[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    """A normalised platform; ``variant`` is ``""`` when it has none."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` (e.g. ``linux/arm64/v8``); InvalidArgument if bad."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {text[:60]!r}: want os/arch[/variant]")
        return normalize(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    def matches(self, other: Platform) -> bool:
        """True when ``other`` (normalised) is the same platform, default variants equal."""
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and _variant(self) == _variant(other)
        )


def normalize(os_name: str, architecture: str, variant: str = "") -> Platform:
    """Build a normalised Platform from possibly un-normalised parts."""
    arch, implied = _ARCH_ALIASES.get(architecture.lower(), (architecture.lower(), ""))
    return Platform(os=os_name.lower(), architecture=arch, variant=(variant or implied).lower())


def current_platform() -> Platform:
    """The platform of this machine, assuming Linux containers."""
    return normalize("linux", _platform.machine())


def _variant(p: Platform) -> str:
    return p.variant or _DEFAULT_VARIANT.get(p.architecture, "")


def select_manifest(index: Mapping[str, Any], want: Platform) -> Mapping[str, Any]:
    """The first ``manifests[]`` descriptor of an OCI index / Docker list matching ``want``.

    Raises FormatError if the index or a descriptor is malformed, NotFound when no entry
    matches.
    """
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError("image index without a 'manifests' array")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            raise FormatError("image index entry without a digest")
        described = entry.get("platform")
        if not isinstance(described, dict):
            continue
        fields = (described.get("os"), described.get("architecture"), described.get("variant", ""))
        if not all(isinstance(v, str) for v in fields):
            raise FormatError("image index entry with a malformed platform")
        os_name, arch, variant = (str(v) for v in fields)
        if want.matches(normalize(os_name, arch, variant)):
            return entry
    raise NotFound(f"no manifest for platform {want} in the image index")
