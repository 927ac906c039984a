"""The containerd snapshotter contract, written down once.

Keys and names are opaque strings: containerd sends namespaced keys such as
``default/12/extract-123-AbCd sha256:...`` (slashes and a space), and bare chainIDs for
remote snapshots. Every implementation refers to this Protocol; the gRPC edge
(``snapshotter/api``) converts requests to these calls and typed errors to status codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from snapshotter.model import Info, Mount, Usage


class Snapshotter(Protocol):
    """What containerd may ask of a snapshotter. Errors are ``snapshotter.errdefs`` types."""

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create an active snapshot on top of committed ``parent`` ("" for none).

        Raises AlreadyExists (key taken, or: the layer became a remote snapshot committed
        under ``labels["containerd.io/snapshot.ref"]``), NotFound (parent missing),
        InvalidArgument (empty key, oversized labels, parent not committed).
        """
        ...

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create a read-only view of ``parent``; same errors as ``prepare``."""
        ...

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot.

        Raises NotFound, FailedPrecondition (committed), Unavailable (a remote lower
        layer is down).
        """
        ...

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Commit active ``key`` as ``name``, replacing its labels and recording usage.

        Raises NotFound, FailedPrecondition (not active), AlreadyExists (name taken).
        """
        ...

    async def remove(self, key: str) -> None:
        """Remove a snapshot. Raises NotFound, FailedPrecondition (it has children)."""
        ...

    async def stat(self, key: str) -> Info:
        """Raises NotFound."""
        ...

    async def update(self, info: Info, paths: Sequence[str]) -> Info:
        """Update labels by field paths (``labels``, ``labels.<k>``; none = all labels).

        Raises NotFound, InvalidArgument (other paths, oversized labels).
        """
        ...

    async def list(self, filters: Sequence[str]) -> list[Info]:
        """All snapshots matching any filter (all of them when there are none).

        Raises InvalidArgument for a malformed filter.
        """
        ...

    async def usage(self, key: str) -> Usage:
        """Live usage for active snapshots, the recorded one otherwise. Raises NotFound."""
        ...

    async def cleanup(self) -> None:
        """Remove every directory (and mount) that no record names."""
        ...
