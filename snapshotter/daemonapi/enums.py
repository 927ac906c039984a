"""The names both processes spell: layer formats and daemon modes."""

from __future__ import annotations

import enum


class LayerFormat(enum.StrEnum):
    """How a remote layer's index is read (``LayerSpec.format``)."""

    ESTARGZ = "estargz"
    RAFS_V5 = "rafs-v5"
    RAFS_V6 = "rafs-v6"

    @property
    def is_rafs(self) -> bool:
        """True for nydus RAFS bootstraps (served from a local bootstrap file)."""
        return self is not LayerFormat.ESTARGZ


RAFS_FORMATS = (LayerFormat.RAFS_V5, LayerFormat.RAFS_V6)


class DaemonMode(enum.StrEnum):
    """``dedicated``: one daemon process per remote layer; ``shared``: one for all."""

    DEDICATED = "dedicated"
    SHARED = "shared"
