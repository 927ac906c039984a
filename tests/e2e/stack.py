"""A containerd (+ lazysnap) stack as a test sees it, and parsers for ``ctr snapshots``.

``Stack.snapshotter`` is the name clients pass to ``--snapshotter``: ``lazysnap`` (the proxy
plugin, with ``Stack.lazysnap`` running) or a built-in one such as ``overlayfs`` (used to
cross-check the harness; ``Stack.lazysnap`` is None then).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import Containerd, Lazysnap
from .procs import HarnessError


@dataclass(frozen=True)
class SnapshotListing:
    """One row of ``ctr snapshots ls``."""

    name: str
    parent: str
    kind: str  # "active" | "view" | "committed", lower-cased


@dataclass(frozen=True)
class SnapshotInfo:
    """``ctr snapshots info NAME``: what containerd's metadata layer reports."""

    name: str
    parent: str
    kind: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stack:
    """containerd wired to ``snapshotter`` (and the lazysnap process when that is lazysnap)."""

    snapshotter: str
    containerd: Containerd
    lazysnap: Lazysnap | None
    workdir: Path

    def require_lazysnap(self) -> Lazysnap:
        """The lazysnap process; HarnessError for a stack built on a built-in snapshotter."""
        if self.lazysnap is None:
            raise HarnessError(f"stack uses {self.snapshotter}, not lazysnap")
        return self.lazysnap

    def pull(self, ref: str) -> None:
        """``ctr image pull --plain-http --snapshotter <snapshotter> REF``."""
        self.containerd.pull(ref, snapshotter=self.snapshotter)

    def snapshots_ctr(self, *args: str) -> str:
        """stdout of ``ctr snapshots --snapshotter <snapshotter> ARGS``; CommandError on
        failure."""
        return self.containerd.ctr("snapshots", "--snapshotter", self.snapshotter, *args).stdout

    def list_snapshots(self) -> dict[str, SnapshotListing]:
        """``ctr snapshots ls``, by name. Names never contain whitespace once unpacking is over
        (only the transient ``extract-<n> <chainID>`` keys do), which this parser assumes."""
        rows: dict[str, SnapshotListing] = {}
        for line in self.snapshots_ctr("ls").splitlines()[1:]:
            fields = line.split()
            if len(fields) == 3:
                name, parent, kind = fields
            elif len(fields) == 2:
                (name, kind), parent = fields, ""
            else:
                raise ValueError(f"cannot parse `ctr snapshots ls` line {line!r}")
            rows[name] = SnapshotListing(name, parent, kind.lower())
        return rows

    def snapshot_info(self, name: str) -> SnapshotInfo:
        """``ctr snapshots info NAME`` parsed from its JSON."""
        raw: dict[str, Any] = json.loads(self.snapshots_ctr("info", name))
        return SnapshotInfo(raw["Name"], raw.get("Parent", ""), str(raw["Kind"]).lower(),
                            dict(raw.get("Labels") or {}))

    def snapshot_usage(self) -> dict[str, tuple[int, int]]:
        """``ctr snapshots usage -b``: name -> (size in bytes, inodes)."""
        usage: dict[str, tuple[int, int]] = {}
        for line in self.snapshots_ctr("usage", "-b").splitlines()[1:]:
            name, size, inodes = line.split()
            usage[name] = (int(size), int(inodes))
        return usage
