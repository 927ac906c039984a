"""The control protocol between the daemon manager and a daemon, version 1.

HTTP/1.1 with JSON bodies over the daemon's unix socket (server:
``snapshotter.fs.control.ControlServer``, client: ``daemonapi.client.ControlClient``)::

    GET    /v1/status                          200 DaemonStatus
    POST   /v1/layers           body LayerSpec  201 LayerStatus
    DELETE /v1/layers/{id}                     200 {}
    GET    /v1/layers/{id}/ready?timeout=S     200 LayerStatus   (long poll, see below)
    POST   /v1/shutdown                        202 {}            (the daemon then exits)

Errors are ``{"error": {"code": CODE, "message": TEXT}}`` with the codes and statuses of
``ERRORS``: ``invalid_argument`` 400, ``not_found`` 404, ``already_exists`` 409,
``failed_precondition`` 409, ``layer_failed`` 409 (the layer could not be mounted; the
message is ``<reason>: <detail>``, see ``daemonapi.reasons``), ``timeout`` 504 (the ready
wait ran out), ``unavailable`` 503 (the daemon is stopping), ``internal`` 500.

``/ready`` answers as soon as the layer is mounted and its prefetch has finished (or
given up: prefetch only warms the cache), or it failed, or ``timeout`` seconds passed; the
server waits on an event, and the client on the open request, so nobody polls.
"""

from __future__ import annotations

from collections.abc import Mapping

from snapshotter.errdefs import (
    AlreadyExists,
    DaemonError,
    FailedPrecondition,
    InvalidArgument,
    LazysnapError,
    NotFound,
    Unavailable,
)

STATUS = "/v1/status"
LAYERS = "/v1/layers"
SHUTDOWN = "/v1/shutdown"


def layer_path(layer_id: int | str) -> str:
    return f"{LAYERS}/{layer_id}"


def ready_path(layer_id: int | str) -> str:
    return f"{LAYERS}/{layer_id}/ready"


ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidArgument, 400, "invalid_argument"),
    (NotFound, 404, "not_found"),
    (AlreadyExists, 409, "already_exists"),
    (FailedPrecondition, 409, "failed_precondition"),
    (DaemonError, 409, "layer_failed"),
    (TimeoutError, 504, "timeout"),
    (Unavailable, 503, "unavailable"),
)
CLIENT_ERRORS: Mapping[str, type[LazysnapError]] = {
    "invalid_argument": InvalidArgument,
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "failed_precondition": FailedPrecondition,
}
