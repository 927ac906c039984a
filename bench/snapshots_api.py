"""containerd's Snapshots API called directly (``containerd.services.snapshots.v1``).

The bench talks to *containerd's* socket, not to the snapshotter's: every call goes
through containerd's metadata layer exactly as the unpacker's and the runtime's calls do,
with the snapshotter named in the request and the namespace (and a lease, so that
containerd's garbage collector leaves the bench's snapshots alone) in gRPC metadata.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from snapshotter._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2 as pb,
)
from snapshotter._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)


@dataclass(frozen=True)
class MountSpec:
    """One mount as containerd returns it."""

    type: str
    source: str
    options: tuple[str, ...]

    def argv(self, target: str) -> list[str]:
        """The ``mount(8)`` command that mounts this at ``target``."""
        opts = ",".join(self.options)
        if self.type == "bind":
            return ["mount", "-o", opts, self.source, target]
        return ["mount", "-t", self.type, *(["-o", opts] if opts else []), self.source, target]


class SnapshotsClient:
    """An asyncio client for containerd's Snapshots service; use ``async with``.

    Errors are ``grpc.aio.AioRpcError`` with containerd's status code.
    """

    def __init__(self, socket: Path, namespace: str, lease: str = "") -> None:
        self._channel = grpc.aio.insecure_channel(f"unix://{socket}")
        self._stub: Any = pb_grpc.SnapshotsStub(self._channel)
        md = [("containerd-namespace", namespace)]
        if lease:
            md.append(("containerd-lease", lease))
        self._md = tuple(md)

    async def __aenter__(self) -> SnapshotsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close(None)

    @staticmethod
    def _mounts(resp: Any) -> list[MountSpec]:
        return [MountSpec(m.type, m.source, tuple(m.options)) for m in resp.mounts]

    async def prepare(self, snapshotter: str, key: str, parent: str = "",
                      labels: Mapping[str, str] | None = None) -> list[MountSpec]:
        """Prepare an active snapshot ``key`` on ``parent``; its mounts."""
        req = pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent,
                                        labels=dict(labels or {}))
        return self._mounts(await self._stub.Prepare(req, metadata=self._md))

    async def view(self, snapshotter: str, key: str, parent: str) -> list[MountSpec]:
        """A read-only view ``key`` of ``parent``; its mounts."""
        req = pb.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        return self._mounts(await self._stub.View(req, metadata=self._md))

    async def mounts(self, snapshotter: str, key: str) -> list[MountSpec]:
        """The mounts of active snapshot or view ``key``."""
        req = pb.MountsRequest(snapshotter=snapshotter, key=key)
        return self._mounts(await self._stub.Mounts(req, metadata=self._md))

    async def commit(self, snapshotter: str, name: str, key: str) -> None:
        """Commit active snapshot ``key`` as ``name``."""
        req = pb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key)
        await self._stub.Commit(req, metadata=self._md)

    async def remove(self, snapshotter: str, key: str) -> None:
        """Remove snapshot ``key``."""
        req = pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        await self._stub.Remove(req, metadata=self._md)

    async def cycle(self, snapshotter: str, key: str) -> dict[str, float]:
        """Prepare, Mounts, Commit, Remove (the committed snapshot) of a new snapshot
        with no parent; seconds per call and for the whole cycle."""
        t0 = time.perf_counter()
        await self.prepare(snapshotter, key)
        t1 = time.perf_counter()
        await self.mounts(snapshotter, key)
        t2 = time.perf_counter()
        await self.commit(snapshotter, key + "-committed", key)
        t3 = time.perf_counter()
        await self.remove(snapshotter, key + "-committed")
        t4 = time.perf_counter()
        return {"prepare": t1 - t0, "mounts": t2 - t1, "commit": t3 - t2, "remove": t4 - t3,
                "cycle": t4 - t0}


def already_exists(exc: BaseException) -> bool:
    """True for the ALREADY_EXISTS answer a remote snapshotter gives a lazy layer."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.ALREADY_EXISTS


class Lease:
    """A containerd lease made with ``ctr leases create``; deleted with ``--sync``."""

    def __init__(self, ctr_argv: list[str], lease_id: str) -> None:
        self._ctr = ctr_argv
        self.id = lease_id

    def __enter__(self) -> Lease:
        subprocess.run([*self._ctr, "leases", "create", "--id", self.id, "--expires", "2h"],
                       check=True, capture_output=True, timeout=60)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([*self._ctr, "leases", "delete", "--sync", self.id],
                       check=False, capture_output=True, timeout=600)
