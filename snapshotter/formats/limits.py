"""Parsing budgets for untrusted layer metadata, defined once.

Every byte of a footer, TOC or bootstrap comes from whoever pushed the image, so each
parser takes explicit budgets and refuses input over them with ``LimitExceeded`` (a
``FormatError``) before the input can cost more than a layer within them. The defaults
fit real layers with a wide margin (the largest public layers name a few hundred
thousand files) and keep the worst accepted TOC within the default memory limits of the
processes that parse it (``[daemon] memory_limit``, ``[remote] check_memory_limit``).
``snapshotter.config`` takes its ``[remote]`` defaults from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from snapshotter.errdefs import InvalidArgument

MAX_TOC_BYTES = 64 << 20
"""Largest TOC JSON (and largest nydus bootstrap layer) accepted, bytes."""
MAX_TOC_ENTRIES = 1_000_000
"""Most entries a layer may have, named ones and implied directories together."""
MAX_IMPLICIT_DIRS = 65_536
"""Most directories a TOC may imply beyond the entries it names."""


@dataclass(frozen=True, slots=True)
class TocLimits:
    """The budgets of one TOC: see the module constants for each field's meaning."""

    toc_bytes: int = MAX_TOC_BYTES
    entries: int = MAX_TOC_ENTRIES
    implicit_dirs: int = MAX_IMPLICIT_DIRS

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> TocLimits:
        """Parse ``{"toc_bytes": .., "entries": .., "implicit_dirs": ..}`` (each optional,
        non-negative integers); raises InvalidArgument otherwise."""
        if not isinstance(raw, dict):
            raise InvalidArgument("TOC limits must be a JSON object")
        unknown = set(raw) - {"toc_bytes", "entries", "implicit_dirs"}
        if unknown:
            raise InvalidArgument(f"unknown TOC limit keys: {sorted(unknown)}")
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"TOC limit {key} must be a non-negative integer")
        return cls(**raw)
