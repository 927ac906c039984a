"""The snapshot model: kinds, info, usage and mounts as plain frozen dataclasses.

These are the types the snapshotter core speaks; protobuf messages exist only in
``snapshotter/api``. Timestamps are integer nanoseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Kind(enum.Enum):
    """The kind of a snapshot; values are the words containerd's filters use."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True, slots=True)
class Info:
    """What Stat, List and Update report about one snapshot."""

    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk usage of a snapshot: bytes and inodes."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount a client performs: ``mount -t type -o options source target``."""

    type: str
    source: str
    options: tuple[str, ...] = ()
