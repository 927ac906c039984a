"""The one table from lazysnap's typed errors to gRPC status codes (protocol-reference §1.6).

containerd classifies a backend error by its code only, so every error that reaches the
gRPC edge must be one of these classes; anything else is a bug, logged with its traceback
and reported as INTERNAL (never UNKNOWN).
"""

from __future__ import annotations

import grpc

from snapshotter import errdefs

# Most specific classes first: BlobNotFound is both a RegistryError and a NotFound.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errdefs.NotFound, grpc.StatusCode.NOT_FOUND),
    (errdefs.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errdefs.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errdefs.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errdefs.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errdefs.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (errdefs.RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errdefs.DaemonError, grpc.StatusCode.UNAVAILABLE),
    (errdefs.FormatError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_code(err: BaseException) -> grpc.StatusCode:
    """The gRPC code for ``err``; INTERNAL for anything not in the table."""
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL
