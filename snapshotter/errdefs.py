"""The error classes of lazysnap: one root, one subclass per class of failure.

This is a leaf module (it imports nothing from the project). Every layer raises these
typed errors; each edge maps them exactly once: ``api/errors.py`` to gRPC status codes,
the FUSE operations to errno values, the HTTP client from HTTP status codes. Nothing in
the project classifies an error by its message.
"""

from __future__ import annotations


class LazysnapError(Exception):
    """Root of every error lazysnap raises on purpose."""


# --- the containerd error classes (errdefs), mapped to gRPC codes in api/errors.py ----------


class NotFound(LazysnapError):
    """The named snapshot, parent, blob or object does not exist."""


class AlreadyExists(LazysnapError):
    """A snapshot with that key or name exists already."""


class InvalidArgument(LazysnapError):
    """The request itself is malformed (empty key, bad filter, oversized labels, ...)."""


class FailedPrecondition(LazysnapError):
    """The request is well-formed but the state forbids it (remove with children, ...)."""


class Unavailable(LazysnapError):
    """A resource needed to serve the request is down (a remote layer's daemon, ...)."""


class Unimplemented(LazysnapError):
    """The operation is not supported."""


class Internal(LazysnapError):
    """An invariant was broken; a bug or an environment failure we could not classify."""


# --- configuration and start-up ------------------------------------------------------------


class ConfigError(LazysnapError):
    """The configuration file or a flag is invalid (unknown key, wrong type, bad value)."""


class StartupError(LazysnapError):
    """The service cannot start: root not writable, overlay unsupported, socket in use."""


# --- formats -------------------------------------------------------------------------------


class FormatError(LazysnapError):
    """Bytes that should be an eStargz, RAFS or EROFS structure are malformed.

    Parsers raise only this (never IndexError, struct.error, UnicodeDecodeError...).
    """


class LimitExceeded(FormatError):
    """Input is over a parsing budget (entries, implied directories, nesting, inflated
    size, memory or time of the bounded parser): refused before it could cost more."""


class DigestMismatch(FormatError):
    """Data does not match the digest that was promised for it (TOC, chunk, blob)."""


# --- registry ------------------------------------------------------------------------------


class RegistryError(LazysnapError):
    """A registry call failed. Messages never carry credentials."""


class RegistryUnavailable(RegistryError):
    """Connection refused or reset, 5xx, or the retry deadline passed. Retryable."""


class RegistryTimeout(RegistryUnavailable):
    """A request or the overall deadline timed out."""


class RegistryAuthError(RegistryError):
    """Authentication failed (401/403 after the token flow). Not retryable."""


class BlobNotFound(RegistryError, NotFound):
    """The registry answered 404 for a blob or manifest."""


class RangeNotSatisfiable(RegistryError):
    """The registry answered 416 for a range request."""


# --- remote layers and daemons -------------------------------------------------------------


class RemoteLayerError(LazysnapError):
    """A layer cannot be served remotely; Prepare falls back to an ordinary pull.

    ``reason`` is a short, bounded token used as a metric label and in the decision log
    line (``not_estargz``, ``digest_mismatch``, ``registry_error``, ``timeout``, ...).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoTocDigest(InvalidArgument):
    """A layer has no TOC digest to verify against and verification may not be skipped."""


class DaemonError(LazysnapError):
    """A FUSE daemon failed to start, to become ready, or to answer its control socket."""
