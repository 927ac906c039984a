"""Every label key lazysnap reads or writes, who sets it, and typed accessors.

containerd forwards to a snapshotter only ``containerd.io/snapshot.ref`` and labels with
the prefix ``containerd.io/snapshot/`` (protocol-reference §1.5). Each key+value pair is at
most 4096 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

from snapshotter.registry.reference import is_digest

MAX_LABEL_BYTES = 4096

# Set by containerd's unpacker on the extraction Prepare: the chainID being prepared.
TARGET_REF = "containerd.io/snapshot.ref"
INHERITED_PREFIX = "containerd.io/snapshot/"

# Set by containerd's CRI / nerdctl / `ctr-remote rpull --use-containerd-labels`.
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"

# Set by stargz-snapshotter's default handler (`ctr-remote image rpull`).
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
STARGZ_URLS = "containerd.io/snapshot/remote/urls"
STARGZ_PREFETCH = "containerd.io/snapshot/remote/stargz.prefetch"
STARGZ_SKIP_VERIFY = "containerd.io/snapshot/remote/stargz.skipverify"

# A manifest layer annotation written by eStargz producers; inherited as a label.
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"

# Written by lazysnap on the remote snapshots it commits (the stargz convention).
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "remote snapshot"
# Written by lazysnap: which format served the remote snapshot (estargz, rafs-v5, rafs-v6).
REMOTE_FORMAT = "containerd.io/snapshot/lazysnap.format"

# nydus manifest layer annotations (protocol-reference §5.2).
NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
NYDUS_REF = "containerd.io/snapshot/nydus-ref"
# Written by nydus converters (lazysnap's included) on the bootstrap layer: "5" or "6".
NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"


def layer_source(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """The ``(image reference, layer digest)`` the labels name, or None.

    CRI labels win over stargz's own, as in stargz-snapshotter's ``sources``.
    """
    for ref_key, dgst_key in ((CRI_IMAGE_REF, CRI_LAYER_DIGEST), (STARGZ_REFERENCE, STARGZ_DIGEST)):
        ref, dgst = labels.get(ref_key, ""), labels.get(dgst_key, "")
        if ref and dgst:
            return ref, dgst
    return None


def following_layers(labels: Mapping[str, str]) -> list[str]:
    """Digests of the layers after this one in the image, as the labels list them
    (``cri.image-layers`` with the CRI labels, else ``stargz.layers``: this layer first,
    then the following ones, possibly cut short by the 4096-byte label limit).

    Only ``sha256:<64 hex>`` entries are returned, in order, without this layer and
    without duplicates; no list (or no layer source) is an empty list.
    """
    source = layer_source(labels)
    if source is None:
        return []
    _, this = source
    key = CRI_IMAGE_LAYERS if labels.get(CRI_LAYER_DIGEST) == this else STARGZ_LAYERS
    out: list[str] = []
    for raw in labels.get(key, "").split(","):
        digest = raw.strip()
        if digest != this and digest not in out and is_digest(digest):
            out.append(digest)
    return out


def is_remote(labels: Mapping[str, str]) -> bool:
    """True when the snapshot was committed by lazysnap as a remote snapshot."""
    return labels.get(REMOTE) == REMOTE_VALUE


def skip_verify(labels: Mapping[str, str]) -> bool:
    """True when the client asked to skip TOC verification (`--skip-content-verify`)."""
    return labels.get(STARGZ_SKIP_VERIFY, "").lower() == "true"
