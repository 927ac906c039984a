"""What a daemon reports about itself and its layers (``GET /v1/status``, ``/ready``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class LayerStatus:
    """One layer as the daemon sees it.

    ``ready``: mounted and prefetch finished (or gave up). ``error``: why the layer could
    not be mounted (then it is not served). ``fetched_bytes``: compressed bytes fetched
    from the registry for this layer; ``total_bytes``: compressed blob size (0 until the
    layer is opened). ``fully_fetched``: the background fetch completed.
    """

    layer_id: int
    digest: str
    ready: bool
    error: str | None
    fetched_bytes: int
    total_bytes: int
    fully_fetched: bool
    prefetch_done: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LayerStatus:
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """The daemon: ``state`` is ``starting``, ``running`` or ``stopping``; ``mode`` is
    ``dedicated`` or ``shared``; ``cache`` and ``reader`` are counter dictionaries (the
    chunk cache's ``CacheStats`` and the sum of the layers' ``ReaderCounters``);
    ``counters`` is ``snapshotter.metrics.counters.DaemonCounters.to_json()`` (FUSE
    requests, prefetch and background fetch, registry requests) for the metrics endpoint.

    ``from_json`` fills fields with defaults that the JSON lacks (a daemon started by an
    older lazysnap and re-attached); a missing required field raises KeyError.
    """

    state: str
    pid: int
    mode: str
    mountpoint: str
    layers: list[LayerStatus]
    cache: dict[str, int] = field(default_factory=dict)
    reader: dict[str, int] = field(default_factory=dict)
    rss_bytes: int = 0
    counters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [layer.to_json() for layer in self.layers]
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DaemonStatus:
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw or _required(f)}
        values["layers"] = [LayerStatus.from_json(x) for x in raw["layers"]]
        return cls(**values)


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING
