"""Why a layer is not served lazily: one enum of reasons and one table from errors to them.

A reason is a short, bounded token: the ``reason=`` of the decision log line that
containerd's operators read, and the ``reason`` label of
``lazysnap_remote_fallbacks_total``. The snapshotter's checks and the daemons use the
same table (``reason_for``), so a daemon's own refusal (its layer error reads
``<reason>: <detail>``) reaches the log and the metric unchanged (``LayerFailed``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from snapshotter.errdefs import (
    BlobNotFound,
    DaemonError,
    DigestMismatch,
    FormatError,
    InvalidArgument,
    LazysnapError,
    LimitExceeded,
    NoTocDigest,
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
    (FormatError, Reason.FORMAT_ERROR),
    (BlobNotFound, Reason.BLOB_NOT_FOUND),
    (RegistryAuthError, Reason.REGISTRY_AUTH),
    (RegistryTimeout, Reason.TIMEOUT),
    (RegistryUnavailable, Reason.REGISTRY_UNAVAILABLE),
    (RegistryError, Reason.REGISTRY_ERROR),
    (NoTocDigest, Reason.NO_TOC_DIGEST),
    (InvalidArgument, Reason.INVALID_LAYER),
    (MemoryError, Reason.RESOURCE_LIMIT),
)
"""The one table: an error's class to its reason, first match wins."""


@dataclass(frozen=True)
class Wording:
    """How one place names the table's reasons: ``renames`` maps a reason of the table to
    the one used there, ``other`` names what the table does not."""

    renames: Mapping[Reason, Reason]
    other: Reason


ESTARGZ_CHECK = Wording({Reason.FORMAT_ERROR: Reason.INVALID_TOC,
                         Reason.REGISTRY_UNAVAILABLE: Reason.REGISTRY_ERROR,
                         Reason.INVALID_LAYER: Reason.INVALID_SOURCE,
                         Reason.RESOURCE_LIMIT: Reason.LIMIT_EXCEEDED}, Reason.INVALID_SOURCE)
"""serve's check of an eStargz layer."""
NYDUS_CHECK = Wording({**ESTARGZ_CHECK.renames, Reason.FORMAT_ERROR: Reason.INVALID_BOOTSTRAP},
                      Reason.INVALID_SOURCE)
"""serve's check of a nydus bootstrap layer."""
DAEMON = Wording({Reason.TIMEOUT: Reason.REGISTRY_UNAVAILABLE}, Reason.INTERNAL)
"""A daemon opening a layer (its registry reads retry, so a timeout is unavailability)."""


def reason_for(exc: BaseException, wording: Wording) -> Reason:
    """The reason for ``exc`` in ``wording``: the first row of the table ``exc`` is an
    instance of, renamed as ``wording`` says. A ``RemoteLayerError`` or ``LayerFailed``
    keeps its own reason."""
    if isinstance(exc, (RemoteLayerError, LayerFailed)):
        return Reason(exc.reason)
    for kind, reason in _TABLE:
        if isinstance(exc, kind):
            return wording.renames.get(reason, reason)
    return wording.other


def fallback(exc: LazysnapError, wording: Wording = ESTARGZ_CHECK) -> RemoteLayerError:
    """``exc`` as the ``RemoteLayerError`` Prepare falls back with (see ``reason_for``)."""
    if isinstance(exc, RemoteLayerError):
        return exc
    return RemoteLayerError(reason_for(exc, wording), str(exc))


def daemon_fallback(exc: BaseException) -> BaseException:
    """What a failed daemon mount falls back with: a daemon's own refusal keeps its reason
    (``LayerFailed``), any other daemon or OS failure is ``daemon_error``; anything else
    (a bug) is returned as it is, to be re-raised."""
    if isinstance(exc, LayerFailed):
        return RemoteLayerError(exc.reason, exc.detail)
    if isinstance(exc, (DaemonError, OSError)):
        return RemoteLayerError(Reason.DAEMON_ERROR, str(exc))
    return exc


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
