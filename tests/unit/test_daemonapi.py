"""The daemon contract's reason table: one lookup, worded per place, a daemon's own reason
carried through to the snapshotter's fallback."""

from __future__ import annotations

import pytest

from snapshotter.daemonapi.reasons import (
    DAEMON,
    ESTARGZ_CHECK,
    NYDUS_CHECK,
    LayerFailed,
    Reason,
    daemon_fallback,
    fallback,
    reason_for,
)
from snapshotter.errdefs import (
    DaemonError,
    DigestMismatch,
    FormatError,
    InvalidArgument,
    LimitExceeded,
    NoTocDigest,
    RegistryTimeout,
    RegistryUnavailable,
    RemoteLayerError,
)


@pytest.mark.parametrize(("exc", "check", "nydus", "daemon"), [
    (FormatError("x"), "invalid_toc", "invalid_bootstrap", "format_error"),
    (LimitExceeded("x"), "limit_exceeded", "limit_exceeded", "limit_exceeded"),
    (DigestMismatch("x"), "digest_mismatch", "digest_mismatch", "digest_mismatch"),
    (RegistryTimeout("x"), "timeout", "timeout", "registry_unavailable"),
    (RegistryUnavailable("x"), "registry_error", "registry_error", "registry_unavailable"),
    (NoTocDigest("x"), "no_toc_digest", "no_toc_digest", "no_toc_digest"),
    (InvalidArgument("x"), "invalid_source", "invalid_source", "invalid_layer"),
    (MemoryError(), "limit_exceeded", "limit_exceeded", "resource_limit"),
    (ValueError("x"), "invalid_source", "invalid_source", "internal"),
])
def test_one_table_worded_per_place(exc: BaseException, check: str, nydus: str,
                                    daemon: str) -> None:
    assert (reason_for(exc, ESTARGZ_CHECK), reason_for(exc, NYDUS_CHECK),
            reason_for(exc, DAEMON)) == (check, nydus, daemon)


def test_a_reason_given_is_kept() -> None:
    refused = RemoteLayerError(Reason.NOT_ESTARGZ, "no footer")
    assert fallback(refused) is refused
    assert reason_for(LayerFailed(Reason.DIGEST_MISMATCH, "x"), DAEMON) is Reason.DIGEST_MISMATCH


def test_a_daemons_refusal_reaches_the_fallback_with_its_own_reason() -> None:
    failed = LayerFailed.parse("limit_exceeded: the TOC implies more directories than it may")
    assert (failed.reason, failed.detail) == (Reason.LIMIT_EXCEEDED,
                                              "the TOC implies more directories than it may")
    out = daemon_fallback(failed)
    assert isinstance(out, RemoteLayerError) and out.reason == "limit_exceeded"
    assert str(out) == "the TOC implies more directories than it may"
    # a daemon that failed in any other way is daemon_error; text without a known reason too
    other = daemon_fallback(DaemonError("daemon layer-3 exited during start-up"))
    assert isinstance(other, RemoteLayerError) and other.reason == "daemon_error"
    assert LayerFailed.parse("unavailable: daemon is stopping").reason is Reason.DAEMON_ERROR
    assert LayerFailed.parse("no separator").reason is Reason.DAEMON_ERROR
    bug = KeyError("x")
    assert daemon_fallback(bug) is bug
