"""A nydus image as a registry holds it (protocol-reference §5.1), built from a RAFS image.

Layers, bottom first:

* one **data blob layer** per blob: the blob bytes as they are, media type
  ``application/vnd.oci.image.layer.nydus.blob.v1``, annotations
  ``containerd.io/snapshot/nydus-blob: "true"`` and ``containerd.io/uncompressed`` (the
  blob is not compressed as a whole, so its DiffID is its digest, which is
  ``sha256:<blob id>``: readers fetch it by that name);
* the **bootstrap layer**, last: a gzip tar holding the directory ``image`` (0755) and
  ``image/image.boot`` (0444), as nydus-snapshotter's ``packToTar`` writes it, media type
  ``application/vnd.oci.image.layer.v1.tar+gzip``, annotations
  ``containerd.io/snapshot/nydus-bootstrap: "true"``,
  ``containerd.io/snapshot/nydus-fs-version: "5"|"6"`` and ``containerd.io/uncompressed``.

The tar and gzip streams are deterministic (zero mtimes, root owner), so converting the
same tree twice gives the same digests. The image config is an ordinary OCI config
whose ``rootfs.diff_ids`` list the layers' DiffIDs, so containerd's unpacker computes the
same chain IDs as for any image.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from snapshotter import labels as L
from snapshotter.errdefs import InvalidArgument
from snapshotter.formats.digests import sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
NYDUS_BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
UNCOMPRESSED = "containerd.io/uncompressed"
NYDUS_FS_VERSION = L.NYDUS_FS_VERSION
BOOTSTRAP_DIR = "image"
BOOTSTRAP_NAME = "image/image.boot"


@dataclass(frozen=True)
class LayerBlob:
    """One layer to push: bytes, media type, DiffID and descriptor annotations."""

    data: bytes
    media_type: str
    diff_id: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self) -> dict[str, Any]:
        """The manifest's descriptor of this layer."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data),
                "annotations": dict(self.annotations)}


@dataclass(frozen=True)
class NydusImage:
    """Everything to push: layers (blobs first, bootstrap last), config and manifest."""

    layers: tuple[LayerBlob, ...]
    config: bytes
    manifest: bytes

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)


def bootstrap_tar(bootstrap: bytes) -> bytes:
    """The uncompressed tar of the bootstrap layer (``image/`` and ``image/image.boot``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(BOOTSTRAP_DIR)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        boot = tarfile.TarInfo(BOOTSTRAP_NAME)
        boot.size, boot.mode = len(bootstrap), 0o444
        tar.addfile(boot, io.BytesIO(bootstrap))
    return buf.getvalue()


def bootstrap_layer(bootstrap: bytes, fs_version: str) -> LayerBlob:
    """The bootstrap layer (gzip tar) with the nydus-bootstrap annotations."""
    raw = bootstrap_tar(bootstrap)
    diff_id = sha256_digest(raw)
    data = gzip.compress(raw, compresslevel=6, mtime=0)
    return LayerBlob(data, OCI_LAYER_GZIP, diff_id, {
        L.NYDUS_BOOTSTRAP: "true", NYDUS_FS_VERSION: fs_version, UNCOMPRESSED: diff_id})


def blob_layer(blob_id: str, blob: bytes) -> LayerBlob:
    """A data blob layer; InvalidArgument unless ``blob_id`` is the blob's sha256 hex."""
    digest = sha256_digest(blob)
    if digest != f"sha256:{blob_id}":
        raise InvalidArgument(f"blob id {blob_id} is not the sha256 of its bytes ({digest}): "
                              "a registry could not serve it under that name")
    return LayerBlob(blob, NYDUS_BLOB_MEDIA_TYPE, digest,
                     {L.NYDUS_BLOB: "true", UNCOMPRESSED: digest})


def image_config(diff_ids: Sequence[str], *, architecture: str, os_name: str = "linux",
                 cmd: Sequence[str] | None = None, env: Sequence[str] | None = None,
                 entrypoint: Sequence[str] | None = None) -> bytes:
    """A minimal OCI image config (compact JSON, sorted keys)."""
    run: dict[str, Any] = {}
    if cmd:
        run["Cmd"] = list(cmd)
    if entrypoint:
        run["Entrypoint"] = list(entrypoint)
    run["Env"] = list(env) if env else ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                         "/usr/bin:/sbin:/bin"]
    config = {"architecture": architecture, "os": os_name, "config": run,
              "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def assemble(layers: Sequence[LayerBlob], config: bytes) -> NydusImage:
    """The manifest over ``layers`` and ``config``."""
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config),
                   "size": len(config)},
        "layers": [layer.descriptor() for layer in layers],
    }
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return NydusImage(tuple(layers), config, body)


def nydus_image(bootstrap: bytes, blobs: Mapping[str, bytes], fs_version: str, *,
                architecture: str, cmd: Sequence[str] | None = None,
                env: Sequence[str] | None = None,
                entrypoint: Sequence[str] | None = None) -> NydusImage:
    """Blob layers (in ``blobs`` order) + the bootstrap layer, config and manifest."""
    if fs_version not in ("5", "6"):
        raise InvalidArgument(f"nydus fs version must be 5 or 6, got {fs_version!r}")
    layers = [blob_layer(blob_id, data) for blob_id, data in blobs.items()]
    layers.append(bootstrap_layer(bootstrap, fs_version))
    config = image_config([x.diff_id for x in layers], architecture=architecture, cmd=cmd,
                          env=env, entrypoint=entrypoint)
    return assemble(layers, config)
