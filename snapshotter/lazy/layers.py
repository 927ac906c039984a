"""LazyLayers: the ``RemoteFS`` that mounts eStargz layers through FUSE daemons.

The decision for one layer, in order (each "no" is a ``RemoteLayerError`` whose reason is
the token in brackets; Prepare then falls back to an ordinary pull):
  1. the labels name a source: ``cri.image-ref`` + ``cri.layer-digest`` or
     ``stargz.reference`` + ``stargz.digest``                          [no_source]
  2. the blob's footer is an eStargz footer                             [not_estargz]
  3. a TOC digest label is present, or verification is off by config, or the client set
     ``stargz.skipverify`` and config allows unverified layers          [no_toc_digest]
  4. the TOC hashes to the label's digest                               [digest_mismatch]
  5. the TOC is well-formed and every name stays inside the layer       [invalid_toc]
     and within the parsing budgets (``Config.toc_limits``)           [limit_exceeded]
     (checked while the daemon starts, in a bounded worker process of its own
     (``snapshotter.lazy.parsebox``), so that a hostile TOC cannot take serve's memory; the
     daemon checks it too, and a layer that fails the check is unmounted again)
  6. the daemon mounts the layer and finishes prefetch in time          [daemon_error]
Registry failures map to [blob_not_found], [registry_auth], [timeout], [registry_error].
The whole check is bounded by ``remote.mount_timeout``.

Nydus layers (``snapshotter.lazy.nydus``) take their own path: those the labels mark go there
first, and a layer refused as ``not_estargz`` is looked up in its manifest in case it is
an unmarked nydus layer. Blob layers are served by no daemon (``check`` passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path

from daemon_manager.manager import DaemonManager
from snapshotter import labels as L
from snapshotter.config import Config
from snapshotter.daemonapi.enums import LayerFormat
from snapshotter.daemonapi.reasons import ESTARGZ_CHECK, Reason, daemon_fallback, fallback
from snapshotter.daemonapi.specs import LayerSpec, layer_spec
from snapshotter.errdefs import (
    FormatError,
    LazysnapError,
    RemoteLayerError,
)
from snapshotter.formats import estargz
from snapshotter.lazy import nydus
from snapshotter.lazy.parsebox import ParseBox
from snapshotter.lazy.tocahead import Fetched, TocLookahead
from snapshotter.osutil.files import write_atomically
from snapshotter.registry.base import BlobFetcher
from snapshotter.registry.fetcher import read_tail
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.registry import RegistryClient

log = logging.getLogger(__name__)
# The first request for a layer asks for this many bytes of its end: footer and, for most
# layers, the whole TOC in one round trip (a bigger TOC costs one more request).
TAIL_GUESS = 128 << 10


def registry_hosts(config: Config) -> HostsConfig:
    """The registry client's host configuration from lazysnap's ``[registry]`` table.

    The keys are the same on both sides (daemons get the same table as JSON).
    """
    return HostsConfig.from_dict(dataclasses.asdict(config.registry))


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedToc:
    """A layer's TOC as checked on Prepare: its digest, JSON, blob size, member offset."""

    digest: str
    json: bytes
    blob_size: int
    toc_offset: int


class LazyLayers:
    """Decides, checks and mounts remote layers; see the module docstring."""

    def __init__(self, config: Config, manager: DaemonManager, client: RegistryClient) -> None:
        self.config = config
        self.manager = manager
        self.client = client
        self.parsebox = ParseBox(config.remote.check_memory_limit, config.remote.check_timeout)
        self.nydus = nydus.NydusLayers(config, manager, client, self.parsebox)
        self.lookahead = TocLookahead(self._fetch_ahead)

    async def start(self) -> None:
        """Start the bounded parser processes (so that no Prepare waits for them)."""
        await self.parsebox.start()

    async def aclose(self) -> None:
        """Stop fetching ahead and the parser processes (at shutdown)."""
        await self.lookahead.aclose()
        await self.parsebox.aclose()

    async def mount(self, sid: int, mountpoint: str, labels: Mapping[str, str]) -> str:
        kind = nydus.classify(labels)
        if kind is not None:
            return await self.nydus.mount(sid, mountpoint, labels, kind)
        source = L.layer_source(labels)
        if source is None:
            raise RemoteLayerError("no_source", "the labels name no image reference and digest")
        ref, digest = source
        timeout = self.config.remote.mount_timeout
        started = time.monotonic()
        try:
            fetcher = self.client.open_blob(ref, digest)
            checked = await asyncio.wait_for(
                self._check_estargz(fetcher, labels, self.lookahead.take(ref, digest)), timeout)
        except TimeoutError:
            raise RemoteLayerError("timeout", f"layer check took over {timeout:.0f}s") from None
        except LazysnapError as e:
            refused = fallback(e, ESTARGZ_CHECK)
            kind = await self.nydus.detect(labels) if refused.reason == Reason.NOT_ESTARGZ \
                else None
            if kind is None:
                raise refused from e
            return await self.nydus.mount(sid, mountpoint, labels, kind)
        checked_at = time.monotonic()
        ahead = self.config.remote.toc_lookahead_layers
        if ahead > 0:  # this one is eStargz: its followers are likely to be as well
            self.lookahead.start(ref, L.following_layers(labels)[:ahead])
        try:
            toc_file = await asyncio.to_thread(self._save_toc, sid, checked)
        except OSError as e:
            self._drop_toc(sid)
            raise RemoteLayerError(Reason.DAEMON_ERROR, f"cannot keep the TOC: {e}") from e
        spec = layer_spec(self.config, layer_id=sid, ref=ref, digest=digest,
                          toc_digest=checked.digest, skip_verify=checked.digest is None,
                          toc_file=toc_file, blob_size=checked.blob_size,
                          toc_offset=checked.toc_offset)
        # The TOC's structure is checked (names, types, ranges: build_index) in a bounded
        # worker process while the daemon starts, which checks it again with the same code: the
        # two take about the same time, so a Prepare pays for one of them.
        results = await asyncio.gather(
            self.parsebox.call("estargz_toc", checked.json, checked.blob_size,
                               checked.toc_offset, self.config.toc_limits().to_json()),
            self.manager.mount(sid, mountpoint, spec),
            return_exceptions=True,
        )
        invalid, failed = results
        if isinstance(invalid, BaseException):
            if not isinstance(failed, BaseException):
                await self.manager.unmount(sid)
            self._drop_toc(sid)
            if isinstance(invalid, LazysnapError):
                raise fallback(invalid, ESTARGZ_CHECK) from invalid
            raise invalid
        if isinstance(failed, BaseException):
            self._drop_toc(sid)
            raise daemon_fallback(failed) from failed
        log.debug("layer %s: TOC checked in %.0f ms, mounted %.0f ms later", digest,
                  (checked_at - started) * 1000, (time.monotonic() - checked_at) * 1000)
        return LayerFormat.ESTARGZ.value

    def _toc_path(self, sid: int) -> Path:
        return Path(self.config.toc_dir) / f"{sid}.json"

    def _save_toc(self, sid: int, checked: CheckedToc) -> str:
        """Write the checked TOC for the daemon (atomically); return its path.

        The daemon verifies the file against the TOC digest again and fetches the TOC
        itself if the file is unusable, so this only saves round trips."""
        path = self._toc_path(sid)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomically(path, checked.json, fsync=False)
        return str(path)

    def _drop_stale_tocs(self, keep: set[int]) -> None:
        """Remove TOC files of snapshots that are no longer remote (left by a crash)."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.config.toc_dir):
                stem, _, _ = entry.name.partition(".")
                if not (stem.isdigit() and int(stem) in keep and entry.name.endswith(".json")):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _drop_toc(self, sid: int) -> None:
        with contextlib.suppress(OSError):
            self._toc_path(sid).unlink()

    def _expected_toc_digest(self, labels: Mapping[str, str]) -> str | None:
        """The TOC digest to verify against, None when unverified mounting is allowed."""
        remote = self.config.remote
        if remote.disable_verification:
            return None
        label = labels.get(L.TOC_DIGEST, "")
        if label:
            return label
        if L.skip_verify(labels) and remote.allow_no_verification:
            return None
        raise RemoteLayerError(
            "no_toc_digest",
            f"no {L.TOC_DIGEST} label (unverified layers need stargz.skipverify and"
            " remote.allow_no_verification = true)",
        )

    async def _check_estargz(self, fetcher: BlobFetcher, labels: Mapping[str, str],
                             ahead: Awaitable[Fetched | None]) -> CheckedToc:
        """Fetch footer and TOC, check them; return the TOC. Typed errors only.

        ``ahead`` gives the layer's end if an earlier Prepare fetched it already
        (``snapshotter.lazy.tocahead``); it is checked exactly like a fresh fetch.
        The format is sniffed before the TOC digest label is required, so that a layer
        that is not eStargz at all is reported as such (``not_estargz``), as stargz does.
        """
        early = await ahead
        if early is not None:
            size, tail = early.size, early.tail
        else:
            size, tail = await read_tail(fetcher, TAIL_GUESS)
        if size <= 0:
            raise RemoteLayerError("not_estargz", "the blob is empty")
        try:
            footer = estargz.parse_footer(tail[-estargz.FOOTER_MAX:])
        except FormatError as e:
            raise RemoteLayerError("not_estargz", f"not an eStargz blob: {e}") from e
        expected = self._expected_toc_digest(labels)
        # A TOC bigger than the tail costs one more request; a FormatError here is
        # ``invalid_toc`` (see ``mount``).
        if early is not None and early.toc is not None:
            toc = early.toc
        else:
            toc = await estargz.read_toc(fetcher, size, tail, footer,
                                         self.config.remote.max_toc_bytes)
        if expected is not None:
            estargz.verify_toc(toc, expected)
        return CheckedToc(estargz.toc_digest(toc), toc, size, footer.toc_offset)

    async def _fetch_ahead(self, ref: str, digest: str) -> Fetched:
        """A following layer's end, as ``_check_estargz`` would fetch it (look-ahead)."""
        fetcher = self.client.open_blob(ref, digest)
        size, tail = await read_tail(fetcher, TAIL_GUESS)
        try:
            footer = estargz.parse_footer(tail[-estargz.FOOTER_MAX:])
            toc: bytes | None = await estargz.read_toc(fetcher, size, tail, footer,
                                                       self.config.remote.max_toc_bytes)
        except FormatError:  # not eStargz, or a bad TOC: its Prepare says which
            toc = None
        return Fetched(size, tail, toc)


    def check(self, sid: int) -> None:
        if sid not in self.nydus.daemonless:
            self.manager.check(sid)

    async def unmount(self, sid: int) -> None:
        self.nydus.daemonless.discard(sid)
        await self.manager.unmount(sid)
        self._drop_toc(sid)

    async def restore(self, remote: dict[int, tuple[str, Mapping[str, str]]]) -> None:
        await asyncio.to_thread(self._drop_stale_tocs, set(remote))
        wanted: dict[int, tuple[str, LayerSpec]] = {}
        for sid, (mountpoint, labels) in remote.items():
            if nydus.is_nydus_snapshot(labels):
                spec = self.nydus.restore_spec(sid, mountpoint, labels)
                if spec is not None:
                    wanted[sid] = (mountpoint, spec)
                continue
            source = L.layer_source(labels)
            if source is None:
                log.error("remote snapshot %d has no source labels; cannot serve it", sid)
                continue
            toc = labels.get(L.TOC_DIGEST) or None
            wanted[sid] = (mountpoint, layer_spec(self.config, layer_id=sid, ref=source[0],
                                                  digest=source[1], toc_digest=toc,
                                                  skip_verify=toc is None))
        await self.manager.start(wanted)
