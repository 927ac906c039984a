"""Nydus layers on Prepare: classification, the bootstrap check, the daemon's spec.

Classification (protocol-reference §5.2-5.3), ``classify(labels)``, by label *presence*
as nydus-snapshotter does (the values are not looked at):

* ``containerd.io/snapshot/nydus-bootstrap`` → ``BOOTSTRAP`` (checked first);
* ``containerd.io/snapshot/nydus-blob`` → ``BLOB``.

A layer without those labels is looked up in its image manifest (``detect``, used
after the eStargz sniff said no): a layer whose media type is
``application/vnd.oci.image.layer.nydus.blob.v1`` is a ``BLOB``; in an image that has
nydus blob layers, a tar layer holding ``image/image.boot`` (or the legacy ``image.boot``)
is the ``BOOTSTRAP``.

What each becomes (``NydusLayers.mount``):

* ``BLOB``: an empty remote snapshot, as nydus-snapshotter's skip handler makes it: no
  daemon, nothing downloaded. Its data is read by the bootstrap layer's daemon.
* ``BOOTSTRAP``: the layer blob (small) is fetched whole through the registry client and
  checked against its digest; the bootstrap is extracted from the tar (gzip, zstd or
  plain) and parsed with ``rafs.build_index``; every data blob it names must be a sha256
  hex id that the registry has (``sha256:<blob id>`` in the same repository) and hold
  every chunk range. The bootstrap is written next to the snapshot
  (``<root>/snapshots/<id>/image.boot``, ``bootstrap_path``) and the daemon is asked to
  serve the *whole image's* filesystem from it, fetching chunks by range from the data
  blobs. The bootstrap snapshot is the top of the image, so its FUSE mount is the first
  ``lowerdir`` and the (empty) blob snapshots below it add nothing: the overlay sees the
  image's root filesystem.

Fallback reasons (``RemoteLayerError.reason``), all before anything is mounted:
``no_source`` (no image reference / digest labels), ``bootstrap_too_large`` (the layer is
over ``remote.max_toc_bytes``), ``digest_mismatch`` (the layer blob does not hash to its
digest), ``limit_exceeded`` (a layer that inflates past its limit, too many tar headers,
a bootstrap over ``MAX_BOOTSTRAP_BYTES``, a bootstrap over a parsing budget),
``invalid_bootstrap`` (no bootstrap in the tar, a corrupt tar, a bootstrap the reader
refuses, a blob id that is not a sha256 hex, a chunk past its blob's end),
``blob_not_found`` / ``registry_auth`` / ``timeout`` / ``registry_error`` (the registry),
``daemon_error`` (the daemon could not serve it). The bootstrap layer is an ordinary tar
layer, so containerd can still pull it; data blob layers never fall back.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter import labels as L
from snapshotter.daemonapi.enums import LayerFormat
from snapshotter.daemonapi.reasons import NYDUS_CHECK, daemon_fallback, fallback
from snapshotter.daemonapi.specs import LayerSpec, layer_spec
from snapshotter.errdefs import (
    DaemonError,
    DigestMismatch,
    FormatError,
    LazysnapError,
    RemoteLayerError,
)
from snapshotter.formats import rafs
from snapshotter.formats.bootstrap_tar import (
    MAX_BOOTSTRAP_BYTES,
)
from snapshotter.formats.digests import sha256_digest
from snapshotter.osutil.files import write_atomically

if TYPE_CHECKING:  # the daemon imports this module for the helpers only
    from daemon_manager.manager import DaemonManager
    from snapshotter.config import Config
    from snapshotter.lazy.parsebox import ParseBox
    from snapshotter.registry.registry import RegistryClient

log = logging.getLogger(__name__)

NYDUS_BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
BLOB_FORMAT = "nydus-blob"
SERVED_FORMATS = (rafs.RAFS_V5, rafs.RAFS_V6)
BOOTSTRAP_FILE_NAME = "image.boot"
_MANIFEST_CACHE = 32


class NydusKind(enum.Enum):
    """What a nydus image layer is."""

    BLOB = "blob"
    BOOTSTRAP = "bootstrap"


def classify(labels: Mapping[str, str]) -> NydusKind | None:
    """The nydus kind the labels give the layer, None for a layer they do not mark."""
    if L.NYDUS_BOOTSTRAP in labels:
        return NydusKind.BOOTSTRAP
    if L.NYDUS_BLOB in labels:
        return NydusKind.BLOB
    return None


def is_blob_snapshot(labels: Mapping[str, str]) -> bool:
    """True for a committed remote snapshot of a nydus data blob layer (no daemon)."""
    return labels.get(L.REMOTE_FORMAT) == BLOB_FORMAT


def is_nydus_snapshot(labels: Mapping[str, str]) -> bool:
    """True for a committed remote snapshot that ``NydusLayers`` made."""
    return labels.get(L.REMOTE_FORMAT) in (BLOB_FORMAT, *SERVED_FORMATS)


def bootstrap_path(mountpoint: str) -> Path:
    """Where a bootstrap snapshot's bootstrap lives: next to its ``fs`` directory."""
    return Path(mountpoint).parent / BOOTSTRAP_FILE_NAME


class NydusLayers:
    """Mounts nydus layers for ``LazyLayers`` (see the module docstring).

    ``daemonless`` holds the snapshot ids of blob layers (served by nobody, always
    available).
    """

    def __init__(self, config: Config, manager: DaemonManager, client: RegistryClient,
                 parsebox: ParseBox) -> None:
        self.config = config
        self.manager = manager
        self.client = client
        self.parsebox = parsebox
        self.daemonless: set[int] = set()
        self._manifests: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def mount(self, sid: int, mountpoint: str, labels: Mapping[str, str],
                    kind: NydusKind) -> str:
        """Serve the layer; return its format (``nydus-blob``, ``rafs-v5``, ``rafs-v6``).

        Raises RemoteLayerError as described in the module docstring.
        """
        if kind is NydusKind.BLOB:
            self.daemonless.add(sid)
            return BLOB_FORMAT
        source = L.layer_source(labels)
        if source is None:
            raise RemoteLayerError("no_source", "the labels name no image reference and digest")
        ref, digest = source
        timeout = self.config.remote.mount_timeout
        try:
            boot, fmt = await asyncio.wait_for(self._check(ref, digest), timeout)
        except TimeoutError:
            raise RemoteLayerError("timeout", f"bootstrap check took over {timeout:.0f}s") \
                from None
        except LazysnapError as e:
            raise fallback(e, NYDUS_CHECK) from e
        path = bootstrap_path(mountpoint)
        await asyncio.to_thread(write_atomically, path, boot)
        spec = self.spec(sid, ref, digest, fmt, str(path), sha256_digest(boot))
        try:
            await self.manager.mount(sid, mountpoint, spec)
        except (DaemonError, OSError) as e:  # LayerFailed is a DaemonError
            path.unlink(missing_ok=True)
            raise daemon_fallback(e) from e
        return fmt

    async def _check(self, ref: str, digest: str) -> tuple[bytes, str]:
        """Fetch and check the bootstrap layer (parsed in serve's bounded parser
        process); return the bootstrap's bytes and format."""
        limit = self.config.remote.max_toc_bytes
        fetcher = self.client.open_blob(ref, digest)
        size = await fetcher.size()
        if size > limit:
            raise RemoteLayerError("bootstrap_too_large",
                                   f"bootstrap layer of {size} bytes is over {limit}")
        (blob,) = await fetcher.fetch([(0, size)]) if size else (b"",)
        if sha256_digest(blob) != digest:
            raise DigestMismatch(f"bootstrap layer does not hash to {digest}")
        boot, fmt, ends = await self.parsebox.call(
            "nydus_bootstrap", blob, min(limit, MAX_BOOTSTRAP_BYTES))
        for blob_digest, end in sorted(ends.items()):
            blob_size = await self.client.open_blob(ref, blob_digest).size()
            if end > blob_size:
                raise FormatError(f"a chunk ends at {end}, past the end of blob "
                                  f"{blob_digest} ({blob_size} bytes)")
        return boot, fmt

    def spec(self, sid: int, ref: str, digest: str, fmt: str, bootstrap: str,
             boot_digest: str) -> LayerSpec:
        """The daemon's LayerSpec for a bootstrap layer (``toc_digest``: the bootstrap's)."""
        return layer_spec(self.config, layer_id=sid, ref=ref, digest=digest,
                          fmt=LayerFormat(fmt), toc_digest=boot_digest, bootstrap=bootstrap)

    def restore_spec(self, sid: int, mountpoint: str,
                     labels: Mapping[str, str]) -> LayerSpec | None:
        """The spec to serve a recorded nydus snapshot again, None when it needs no daemon
        (a blob layer) or cannot be served (logged)."""
        if is_blob_snapshot(labels):
            self.daemonless.add(sid)
            return None
        source = L.layer_source(labels)
        path = bootstrap_path(mountpoint)
        try:
            boot = path.read_bytes()
        except OSError as exc:
            log.error("remote snapshot %d: cannot read its bootstrap: %s", sid, exc)
            return None
        if source is None:
            log.error("remote snapshot %d has no source labels; cannot serve it", sid)
            return None
        fmt = labels.get(L.REMOTE_FORMAT, LayerFormat.RAFS_V6)
        return self.spec(sid, source[0], source[1], fmt, str(path), sha256_digest(boot))

    async def detect(self, labels: Mapping[str, str]) -> NydusKind | None:
        """The nydus kind of a layer without nydus labels, from its image manifest.

        None when the layer is not nydus or the manifest cannot be had (never raises
        but for cancellation): this runs only to rescue a layer already refused.
        """
        source = L.layer_source(labels)
        if source is None:
            return None
        try:
            async with asyncio.timeout(self.config.remote.mount_timeout):
                return await self._detect(*source)
        except TimeoutError:
            log.debug("layer %s: nydus detection timed out", source[1])
            return None

    async def _detect(self, ref: str, digest: str) -> NydusKind | None:
        try:
            layers = await self._manifest_layers(ref)
            desc = next((d for d in layers if d.get("digest") == digest), None)
            if desc is None:
                return None
            if desc.get("mediaType") == NYDUS_BLOB_MEDIA_TYPE:
                return NydusKind.BLOB
            if not any(d.get("mediaType") == NYDUS_BLOB_MEDIA_TYPE for d in layers):
                return None
            limit = self.config.remote.max_toc_bytes
            if int(desc.get("size", 0)) > limit:
                return None
            fetcher = self.client.open_blob(ref, digest)
            size = await fetcher.size()
            (blob,) = await fetcher.fetch([(0, size)]) if size else (b"",)
            await self.parsebox.call("bootstrap_layer", blob, min(limit, MAX_BOOTSTRAP_BYTES))
            return NydusKind.BOOTSTRAP
        except (LazysnapError, ValueError, TypeError) as exc:
            log.debug("layer %s: no nydus layer (%s)", digest, exc)
            return None

    async def _manifest_layers(self, ref: str) -> list[dict[str, Any]]:
        cached = self._manifests.get(ref)
        if cached is None:
            _, _, body = await self.client.get_manifest(ref)
            cached = json.loads(body)
            if not isinstance(cached, dict):
                raise FormatError("the manifest is not a JSON object")
            self._manifests[ref] = cached
            while len(self._manifests) > _MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        layers = cached.get("layers")
        return [d for d in layers if isinstance(d, dict)] if isinstance(layers, list) else []
