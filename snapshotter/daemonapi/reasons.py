"""Why a layer is not served lazily: one enum of reasons and one table from errors to them.

A reason is a short, bounded token: the ``reason=`` of the decision log line that
containerd's operators read, and the ``reason`` label of
``lazysnap_remote_fallbacks_total``. The snapshotter's checks and the daemons use the
same table (``reason_for``), so a daemon's own refusal (its layer error reads
``<reason>: <detail>``) reaches the log and the metric unchanged (``LayerFailed``).
"""

from __future__ import annotations

import enum

from snapshotter.errdefs import (
    BlobNotFound,
    DaemonError,
    DigestMismatch,
    FormatError,
    InvalidArgument,
    LazysnapError,
    LimitExceeded,
    RegistryAuthError,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    RemoteLayerError,
)


class Reason(enum.StrEnum):
    """Every fallback reason (see the module docstring)."""

    NO_SOURCE = "no_source"  # the labels name no image reference and layer digest
    NOT_ESTARGZ = "not_estargz"  # no eStargz footer (and not a nydus layer)
    NO_TOC_DIGEST = "no_toc_digest"  # no TOC digest label and verification is required
    DIGEST_MISMATCH = "digest_mismatch"  # TOC, bootstrap or blob does not match its digest
    INVALID_TOC = "invalid_toc"  # a malformed eStargz TOC
    INVALID_BOOTSTRAP = "invalid_bootstrap"  # a malformed nydus bootstrap
    FORMAT_ERROR = "format_error"  # a malformed index, as a daemon reports it
    BOOTSTRAP_TOO_LARGE = "bootstrap_too_large"  # a bootstrap layer over max_toc_bytes
    LIMIT_EXCEEDED = "limit_exceeded"  # an index over a parsing budget or the parser's limits
    RESOURCE_LIMIT = "resource_limit"  # the daemon ran out of its memory limit
    BLOB_NOT_FOUND = "blob_not_found"
    REGISTRY_AUTH = "registry_auth"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    REGISTRY_ERROR = "registry_error"
    TIMEOUT = "timeout"  # the check or the mount took over remote.mount_timeout
    INVALID_LAYER = "invalid_layer"  # a spec the daemon cannot serve
    INVALID_SOURCE = "invalid_source"  # anything else wrong with the layer's source
    DAEMON_ERROR = "daemon_error"  # the daemon failed for a reason of its own
    INTERNAL = "internal"  # a bug: reported, never hidden


_TABLE: tuple[tuple[type[BaseException], Reason], ...] = (
    (DigestMismatch, Reason.DIGEST_MISMATCH),
    (LimitExceeded, Reason.LIMIT_EXCEEDED),
    (FormatError, Reason.INVALID_TOC),  # replaced by the caller's format reason
    (BlobNotFound, Reason.BLOB_NOT_FOUND),
    (RegistryAuthError, Reason.REGISTRY_AUTH),
    (RegistryTimeout, Reason.TIMEOUT),
    (RegistryUnavailable, Reason.REGISTRY_UNAVAILABLE),
    (RegistryError, Reason.REGISTRY_ERROR),
    (InvalidArgument, Reason.INVALID_LAYER),
    (MemoryError, Reason.RESOURCE_LIMIT),
)


def reason_for(exc: BaseException, *, format_reason: Reason = Reason.INVALID_TOC,
               timeout_reason: Reason = Reason.TIMEOUT,
               other: Reason = Reason.INTERNAL) -> Reason:
    """The reason for ``exc``: the first row of the table it is an instance of.

    ``format_reason`` names a malformed index (``INVALID_TOC``, ``INVALID_BOOTSTRAP``; a
    daemon says ``FORMAT_ERROR``); ``timeout_reason`` a registry timeout (a daemon, whose
    reads retry, says ``REGISTRY_UNAVAILABLE``); ``other`` anything the table does not
    name. A ``RemoteLayerError`` or ``LayerFailed`` keeps its own reason.
    """
    if isinstance(exc, (RemoteLayerError, LayerFailed)):
        return Reason(exc.reason)
    for kind, reason in _TABLE:
        if isinstance(exc, kind):
            if reason is Reason.INVALID_TOC:
                return format_reason
            return timeout_reason if reason is Reason.TIMEOUT else reason
    return other


def fallback(exc: LazysnapError, *, format_reason: Reason = Reason.INVALID_TOC,
             other: Reason = Reason.INVALID_SOURCE) -> RemoteLayerError:
    """``exc`` as the ``RemoteLayerError`` Prepare falls back with (see ``reason_for``)."""
    if isinstance(exc, RemoteLayerError):
        return exc
    return RemoteLayerError(reason_for(exc, format_reason=format_reason, other=other),
                            str(exc))


class LayerFailed(DaemonError):
    """A daemon could not serve a layer; ``reason`` is the daemon's own ``Reason``.

    Built from a layer's error text ``<reason>: <detail>`` (``parse``); a text without
    a known reason becomes ``DAEMON_ERROR``.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message

    @classmethod
    def parse(cls, text: str) -> LayerFailed:
        token, sep, detail = text.partition(": ")
        try:
            return cls(Reason(token), detail) if sep else cls(Reason.DAEMON_ERROR, text)
        except ValueError:
            return cls(Reason.DAEMON_ERROR, text)
