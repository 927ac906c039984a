"""Conversions between protobuf messages and the model. Total: bad input raises.

Only this package imports generated code. An unknown Kind value is InvalidArgument.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.types import mount_pb2
from snapshotter.model import Info, Kind, Mount

_TO_PB = {Kind.VIEW: pb.VIEW, Kind.ACTIVE: pb.ACTIVE, Kind.COMMITTED: pb.COMMITTED}


def kind_to_pb(kind: Kind) -> pb.Kind:
    return _TO_PB[kind]


def timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=kind_to_pb(info.kind),
        created_at=timestamp(info.created_ns),
        updated_at=timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def info_from_pb(msg: pb.Info) -> Info:
    """The fields Update needs; kind and times are ignored (they are immutable)."""
    return Info(
        name=msg.name,
        parent=msg.parent,
        kind=Kind.ACTIVE,
        created_ns=msg.created_at.ToNanoseconds(),
        updated_ns=msg.updated_at.ToNanoseconds(),
        labels=dict(msg.labels),
    )


def mounts_to_pb(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]
