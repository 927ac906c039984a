"""The containerd Snapshots gRPC service: requests in, ``Snapshotter`` calls, replies out.

Each handler converts its request, calls the snapshotter, converts the result; errors are
mapped to status codes in one place (``_guard``) through ``api/errors.py``. An error that
is not a LazysnapError is logged with its traceback and answered as INTERNAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.errors import status_code
from snapshotter.api.messages import info_from_pb, info_to_pb, mounts_to_pb
from snapshotter.errdefs import LazysnapError
from snapshotter.snapshot.base import Snapshotter

log = logging.getLogger(__name__)
R = TypeVar("R")
LIST_BATCH = 100

# Observer for every call: (method, status code name, seconds). Metrics plug in here.
CallObserver = Callable[[str, str, float], None]


def _no_observer(method: str, code: str, seconds: float) -> None:
    pass


class SnapshotsService(pb_grpc.SnapshotsServicer):  # type: ignore[misc]
    """Serves one ``Snapshotter`` over gRPC."""

    def __init__(self, snapshotter: Snapshotter, observe: CallObserver = _no_observer) -> None:
        self.sn = snapshotter
        self.observe = observe

    async def _guard(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[R]
    ) -> R:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await call
        except LazysnapError as e:
            code = status_code(e)
            log.debug("%s: %s: %s", method, code.name, e)
            await _abort(context, code, str(e))
        except Exception as e:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed unexpectedly", method)
            await _abort(context, code, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.observe(method, code.name, time.perf_counter() - start)

    async def Prepare(self, request: pb.PrepareSnapshotRequest, context: Any) -> Any:
        mounts = await self._guard("Prepare", context, self.sn.prepare(
            request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def View(self, request: pb.ViewSnapshotRequest, context: Any) -> Any:
        mounts = await self._guard("View", context, self.sn.view(
            request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def Mounts(self, request: pb.MountsRequest, context: Any) -> Any:
        mounts = await self._guard("Mounts", context, self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=mounts_to_pb(mounts))

    async def Commit(self, request: pb.CommitSnapshotRequest, context: Any) -> Any:
        await self._guard("Commit", context, self.sn.commit(
            request.name, request.key, dict(request.labels)))
        return Empty()

    async def Remove(self, request: pb.RemoveSnapshotRequest, context: Any) -> Any:
        await self._guard("Remove", context, self.sn.remove(request.key))
        return Empty()

    async def Stat(self, request: pb.StatSnapshotRequest, context: Any) -> Any:
        info = await self._guard("Stat", context, self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    async def Update(self, request: pb.UpdateSnapshotRequest, context: Any) -> Any:
        info = await self._guard("Update", context, self.sn.update(
            info_from_pb(request.info), list(request.update_mask.paths)))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    async def List(
        self, request: pb.ListSnapshotsRequest, context: Any
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        infos = await self._guard("List", context, self.sn.list(list(request.filters)))
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i:i + LIST_BATCH]])

    async def Usage(self, request: pb.UsageRequest, context: Any) -> Any:
        usage = await self._guard("Usage", context, self.sn.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(self, request: pb.CleanupRequest, context: Any) -> Any:
        await self._guard("Cleanup", context, self.sn.cleanup())
        return Empty()


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, msg: str
) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("unreachable")  # pragma: no cover - abort always raises
