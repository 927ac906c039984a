"""OCI images built in pure Python from declarative layer specs, pushed with urllib.

A layer is a list of entries (:class:`File`, :class:`Dir`, :class:`Symlink`,
:class:`Hardlink`, :class:`Device`, :class:`Fifo`, :class:`Whiteout`, :class:`Opaque`) with
absolute paths. :func:`build_layer` turns one into a deterministic tar (PAX format, xattrs as
``SCHILY.xattr.`` records, whiteouts as ``.wh.NAME``, opaque directories as
``.wh..wh..opq``); :func:`expected_tree` says what the image's root filesystem must look
like after the layers are applied in order; :func:`push_image` uploads blobs, config and an
OCI manifest to a registry through the distribution HTTP API.

Parent directories that no earlier entry (in this or a lower layer) created are added
implicitly as ``Dir(path)`` with default metadata, right before their first child.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

DEFAULT_MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


@dataclass(frozen=True)
class File:
    """A regular file."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Dir:
    """A directory; over a lower directory it replaces the metadata and keeps the children."""

    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Symlink:
    """A symbolic link; ``target`` is stored verbatim."""

    path: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(frozen=True)
class Hardlink:
    """A hard link to ``target``, a regular file created earlier in the *same* layer."""

    path: str
    target: str


@dataclass(frozen=True)
class Device:
    """A character (``kind="char"``) or block (``kind="block"``) device node."""

    path: str
    kind: Literal["char", "block"]
    major: int
    minor: int
    mode: int = 0o666
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(frozen=True)
class Fifo:
    """A named pipe."""

    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` (and everything below it) from the lower layers (``.wh.NAME``)."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """A directory that hides everything lower layers had below it (``.wh..wh..opq``).

    Emits the directory entry followed by the marker; children come as separate entries.
    """

    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


Entry = File | Dir | Symlink | Hardlink | Device | Fifo | Whiteout | Opaque


@dataclass(frozen=True)
class Layer:
    """One layer: entries in tar order, blob compression and descriptor annotations."""

    entries: Sequence[Entry]
    compression: Literal["gzip", "none"] = "gzip"
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Node:
    """What one path of a root filesystem is (expected) or was seen to be (observed).

    Fields an observer cannot see are None: a container listing has no xattrs, an expected
    tree has no inode numbers. ``hardlink_of`` names the first path of a hard-link group.
    """

    kind: Literal["file", "dir", "symlink", "char", "block", "fifo"]
    mode: int
    uid: int = 0
    gid: int = 0
    size: int | None = None
    md5: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: Mapping[str, bytes] | None = None
    inode: int | None = None
    hardlink_of: str | None = None


Tree = dict[str, Node]


def normalize(path: str) -> str:
    """``path`` as an absolute, normalised image path; ValueError for "/" or ".." parts."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid image path {path!r}")
    return "/" + "/".join(parts)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def _remove_subtree(tree: Tree, path: str, keep: set[str] | None = None) -> None:
    """Delete ``path`` and its descendants (except paths in ``keep``)."""
    prefix = path.rstrip("/") + "/"
    for key in [k for k in tree if k == path or k.startswith(prefix)]:
        if keep is None or key not in keep:
            del tree[key]


def _node_for(entry: Entry, tree: Tree) -> Node:
    match entry:
        case File():
            return Node("file", entry.mode & 0o7777, entry.uid, entry.gid, len(entry.data),
                        hashlib.md5(entry.data).hexdigest(), xattrs=dict(entry.xattrs))
        case Dir() | Opaque():
            xattrs = dict(entry.xattrs) if isinstance(entry, Dir) else {}
            return Node("dir", entry.mode & 0o7777, entry.uid, entry.gid, xattrs=xattrs)
        case Symlink():
            return Node("symlink", 0o777, entry.uid, entry.gid, target=entry.target,
                        xattrs={})
        case Device():
            return Node(entry.kind, entry.mode & 0o7777, entry.uid, entry.gid,
                        rdev=(entry.major, entry.minor), xattrs={})
        case Fifo():
            return Node("fifo", entry.mode & 0o7777, entry.uid, entry.gid, xattrs={})
        case Hardlink():
            target = tree.get(normalize(entry.target))
            if target is None or target.kind != "file":
                raise ValueError(f"hard link {entry.path}: no regular file {entry.target}")
            return replace(target, hardlink_of=target.hardlink_of or normalize(entry.target))
        case Whiteout():
            raise ValueError("a whiteout has no node")


def _apply(tree: Tree, entry: Entry, added: set[str]) -> None:
    """Apply one (already expanded) entry to ``tree`` with overlay/whiteout semantics."""
    path = normalize(entry.path)
    if isinstance(entry, Whiteout):
        _remove_subtree(tree, path)
        return
    if isinstance(entry, Hardlink) and normalize(entry.target) not in added:
        raise ValueError(f"hard link {path}: target {entry.target} is not in the same layer")
    node = _node_for(entry, tree)
    old = tree.get(path)
    if isinstance(entry, Opaque):
        _remove_subtree(tree, path, keep=added)
    elif not (isinstance(entry, Dir) and old is not None and old.kind == "dir"):
        _remove_subtree(tree, path)
    tree[path] = node
    added.add(path)


def _expand(layer: Layer, tree: Tree) -> Iterator[Entry]:
    """Yield the layer's entries with implicit parent directories inserted, applying each
    one to ``tree`` (the tree of the layers below, updated in place) as it goes."""
    added: set[str] = set()
    for entry in layer.entries:
        path = normalize(entry.path)
        for ancestor in _ancestors(path):
            existing = tree.get(ancestor)
            if existing is None:
                implicit = Dir(ancestor)
                _apply(tree, implicit, added)
                yield implicit
            elif existing.kind != "dir":
                raise ValueError(f"{path}: ancestor {ancestor} is a {existing.kind}")
        _apply(tree, entry, added)
        yield entry


def expected_tree(layers: Sequence[Layer]) -> Tree:
    """The root filesystem the layers produce, applied in order (path -> Node, no "/").

    Whiteouts delete lower paths, opaque directories hide lower children, a directory over a
    directory keeps the children, anything else over a directory replaces the subtree.
    Raises ValueError for specs that no layer tar could express (see the entry classes).
    """
    tree: Tree = {}
    for layer in layers:
        for _ in _expand(layer, tree):
            pass
    return tree


def _tarinfo(name: str, entry: Entry) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The tar member(s) for one entry: (header, file data or None)."""
    info = tarfile.TarInfo(name)
    info.mtime = getattr(entry, "mtime", DEFAULT_MTIME)
    info.uid, info.gid = getattr(entry, "uid", 0), getattr(entry, "gid", 0)
    info.mode = getattr(entry, "mode", 0o644) & 0o7777
    data: bytes | None = None
    match entry:
        case File():
            info.type, info.size, data = tarfile.REGTYPE, len(entry.data), entry.data
        case Dir() | Opaque():
            info.type = tarfile.DIRTYPE
        case Symlink():
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
        case Hardlink():
            info.type, info.linkname = tarfile.LNKTYPE, normalize(entry.target)[1:]
        case Device():
            info.type = tarfile.CHRTYPE if entry.kind == "char" else tarfile.BLKTYPE
            info.devmajor, info.devminor = entry.major, entry.minor
        case Fifo():
            info.type = tarfile.FIFOTYPE
        case Whiteout():
            parent, base = _parent(normalize(entry.path)), normalize(entry.path).rsplit("/")[-1]
            info.name = (parent.rstrip("/") + "/" + WHITEOUT_PREFIX + base).lstrip("/")
            info.type, info.size, data = tarfile.REGTYPE, 0, b""
    if isinstance(entry, File | Dir) and entry.xattrs:
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
            for k, v in sorted(entry.xattrs.items())
        }
    members = [(info, data)]
    if isinstance(entry, Opaque):
        marker = tarfile.TarInfo(f"{name.rstrip('/')}/{OPAQUE_MARKER}")
        marker.mtime, marker.mode = info.mtime, 0o644
        members.append((marker, b""))
    return members


def build_layer(layer: Layer, lower: Tree) -> tuple[bytes, Tree]:
    """The uncompressed tar for ``layer`` on top of ``lower``, and the tree afterwards.

    ``lower`` is not modified. Deterministic: the same specs give the same bytes.
    """
    tree = dict(lower)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in _expand(layer, tree):
            for info, data in _tarinfo(normalize(entry.path)[1:], entry):
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue(), tree


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " +
    DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


@dataclass(frozen=True)
class LayerBlob:
    """A layer as pushed: blob bytes, media type, DiffID (sha256 of the uncompressed tar)."""

    data: bytes
    media_type: str
    diff_id: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """``sha256:`` digest of the blob as stored in the registry."""
        return sha256_digest(self.data)


def layer_blob(layer: Layer, lower: Tree) -> tuple[LayerBlob, Tree]:
    """Build and compress ``layer`` over ``lower``; also return the tree afterwards."""
    tar, tree = build_layer(layer, lower)
    if layer.compression == "gzip":
        data, media_type = gzip.compress(tar, compresslevel=6, mtime=0), OCI_LAYER_GZIP
    else:
        data, media_type = tar, OCI_LAYER_TAR
    return LayerBlob(data, media_type, sha256_digest(tar), dict(layer.annotations)), tree


def host_architecture() -> str:
    """The OCI architecture name of this machine (amd64, arm64, ...)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def image_config(
    diff_ids: Sequence[str], *, cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None, env: Sequence[str] = ("PATH=/bin:/usr/bin",),
) -> dict[str, Any]:
    """An OCI image config for linux/<host arch> with the given rootfs DiffIDs."""
    config: dict[str, Any] = {"Env": list(env)}
    if cmd is not None:
        config["Cmd"] = list(cmd)
    if entrypoint is not None:
        config["Entrypoint"] = list(entrypoint)
    return {
        "created": "2023-11-14T22:13:20Z",
        "architecture": host_architecture(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "lazysnap e2e"}
                    for _ in diff_ids],
    }


# Never through an HTTP proxy from the environment: the registry is on 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RegistryError(RuntimeError):
    """The registry refused a request; the message has the method, URL, status and body."""


def _request(
    method: str, url: str, *, data: bytes | None = None, headers: Mapping[str, str] | None = None,
    ok: Sequence[int] = (200, 201, 202, 204),
) -> tuple[int, Mapping[str, str]]:
    """One HTTP request; returns (status, headers). RegistryError for any status not in
    ``ok`` (404 is returned, not raised, when listed in ``ok``)."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=60) as resp:
            resp.read()
            status, resp_headers = resp.status, dict(resp.headers.items())
    except urllib.error.HTTPError as exc:
        status, resp_headers = exc.code, dict(exc.headers.items())
        body = exc.read().decode("utf-8", "replace")
        if status not in ok:
            raise RegistryError(f"{method} {url}: HTTP {status}: {body}") from exc
    if status not in ok:
        raise RegistryError(f"{method} {url}: unexpected HTTP {status}")
    return status, resp_headers


def push_blob(registry: str, name: str, data: bytes) -> str:
    """Upload ``data`` to ``registry`` (``host:port``) under repository ``name``, monolithically
    (POST an upload session, PUT the bytes with ``?digest=``). Returns the digest; skips the
    upload if the registry already has the blob. Raises RegistryError."""
    digest = sha256_digest(data)
    base = f"http://{registry}/v2/{name}/blobs/"
    status, _ = _request("HEAD", base + digest, ok=(200, 404))
    if status == 200:
        return digest
    _, headers = _request("POST", base + "uploads/", data=b"", ok=(202,))
    location = {k.lower(): v for k, v in headers.items()}.get("location")
    if not location:
        raise RegistryError(f"POST {base}uploads/: no Location header")
    parts = urllib.parse.urlsplit(urllib.parse.urljoin(base, location))
    query = [*urllib.parse.parse_qsl(parts.query), ("digest", digest)]
    url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    _request("PUT", url, data=data, ok=(201,), headers={
        "Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    return digest


def push_manifest(registry: str, name: str, tag: str, manifest: bytes) -> str:
    """PUT an OCI image manifest under ``name:tag``; return its digest, checked against the
    ``Docker-Content-Digest`` the registry answers with. Raises RegistryError."""
    url = f"http://{registry}/v2/{name}/manifests/{tag}"
    _, headers = _request("PUT", url, data=manifest, ok=(201,),
                          headers={"Content-Type": OCI_MANIFEST})
    digest = sha256_digest(manifest)
    answered = {k.lower(): v for k, v in headers.items()}.get("docker-content-digest")
    if answered not in (None, digest):
        raise RegistryError(f"registry stored manifest as {answered}, expected {digest}")
    return digest


@dataclass(frozen=True)
class PushedLayer:
    """A layer as it ended up in the manifest."""

    digest: str
    diff_id: str
    size: int
    media_type: str
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class PushedImage:
    """The result of a push: where the image is and what it is made of."""

    registry: str
    name: str
    tag: str
    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: Mapping[str, Any]
    layers: tuple[PushedLayer, ...]
    chain_ids: tuple[str, ...]

    @property
    def reference(self) -> str:
        """``127.0.0.1:PORT/name:tag``."""
        return f"{self.registry}/{self.name}:{self.tag}"

    @property
    def diff_ids(self) -> tuple[str, ...]:
        """The uncompressed layer digests, bottom first."""
        return tuple(layer.diff_id for layer in self.layers)

    @property
    def top_chain_id(self) -> str:
        """The chain ID of the whole stack (containerd's name for the top snapshot)."""
        return self.chain_ids[-1]


def push_image(
    registry: str, name: str, tag: str, blobs: Sequence[LayerBlob], config: Mapping[str, Any],
) -> PushedImage:
    """Push prepared layer blobs plus ``config`` as an OCI image ``registry/name:tag``.

    ``config["rootfs"]["diff_ids"]`` must list the blobs' DiffIDs in order (ValueError
    otherwise), so that containerd can verify what it unpacks. Raises RegistryError.
    """
    if list(config["rootfs"]["diff_ids"]) != [b.diff_id for b in blobs]:
        raise ValueError("config rootfs.diff_ids does not match the layer blobs")
    layers: list[PushedLayer] = []
    for blob in blobs:
        push_blob(registry, name, blob.data)
        layers.append(PushedLayer(blob.digest, blob.diff_id, len(blob.data), blob.media_type,
                                  dict(blob.annotations)))
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = push_blob(registry, name, config_bytes)
    descriptors: list[dict[str, Any]] = []
    for layer in layers:
        desc: dict[str, Any] = {"mediaType": layer.media_type, "digest": layer.digest,
                                "size": layer.size}
        if layer.annotations:
            desc["annotations"] = dict(layer.annotations)
        descriptors.append(desc)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": descriptors,
    }, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = push_manifest(registry, name, tag, manifest)
    return PushedImage(registry, name, tag, manifest_digest, manifest, config_digest, config,
                       tuple(layers), tuple(chain_ids([b.diff_id for b in blobs])))


def build_and_push(
    registry: str, name: str, tag: str, layers: Sequence[Layer], *,
    cmd: Sequence[str] | None = None, entrypoint: Sequence[str] | None = None,
) -> PushedImage:
    """Build every layer (bottom first), push them with a matching config and manifest."""
    tree: Tree = {}
    blobs: list[LayerBlob] = []
    for layer in layers:
        blob, tree = layer_blob(layer, tree)
        blobs.append(blob)
    config = image_config([b.diff_id for b in blobs], cmd=cmd, entrypoint=entrypoint)
    return push_image(registry, name, tag, blobs, config)
