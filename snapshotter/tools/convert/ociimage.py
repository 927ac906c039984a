"""The root filesystem of an OCI image in a registry, as the writers' ``Spec`` list.

``image_specs(ref)`` fetches the manifest for this machine's platform, then every layer
blob whole (verified against its digest), and applies the layer tars in order the way
containerd's applier does: ``.wh.NAME`` deletes ``NAME`` and what is below it from the
layers beneath, ``.wh..wh..opq`` empties its directory of what the layers beneath put
there, a directory over a directory keeps the children, anything else replaces the path.
Tar hard links become ``hardlink`` specs (a link whose target was deleted later gets the
data of the target). PAX ``SCHILY.xattr.*`` records become xattrs. Layers may be gzip,
zstd or uncompressed tars.

Failure modes: the registry client's errors (``RegistryError`` and subclasses,
``NotFound``), ``DigestMismatch`` for a blob that does not hash to its digest,
``FormatError`` for a manifest or tar that cannot be read, or a nydus image as source.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Protocol

import zstandard

from snapshotter.errdefs import DigestMismatch, FormatError
from snapshotter.registry.hosts import HostsConfig
from snapshotter.tools.convert.tree import Spec

PIECE = 8 << 20
_OPAQUE = ".wh..wh..opq"
_WHITEOUT = ".wh."
_XATTR = "SCHILY.xattr."


class Bar(Protocol):
    """What ``image_specs`` reports progress to (``cli.ProgressBar``)."""

    def start(self, phase: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


def _norm(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"tar entry {name!r} leaves the root")
    return "/".join(parts)


class RootFS:
    """Paths (no leading ``/``) to specs, in insertion order; hard links share a Spec."""

    def __init__(self) -> None:
        self.paths: dict[str, Spec] = {}

    def _remove(self, path: str, keep: set[str] | None = None) -> None:
        prefix = path + "/"
        for p in [p for p in self.paths if p == path or p.startswith(prefix)]:
            if keep is None or p not in keep:
                del self.paths[p]

    def apply(self, tar_bytes: bytes) -> None:
        """Apply one layer tar (see the module docstring)."""
        added: set[str] = set()
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for member in tar:
                self._entry(tar, member, added)

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, added: set[str]) -> None:
        path = _norm(member.name)
        parent, _, name = path.rpartition("/")
        if name == _OPAQUE:
            self._remove(parent, keep=added | {parent})
            return
        if name.startswith(_WHITEOUT):
            self._remove(f"{parent}/{name[4:]}" if parent else name[4:])
            return
        if not path:
            return
        old = self.paths.get(path)
        if not (member.isdir() and old is not None and old.kind == "dir"):
            self._remove(path)
        added.add(path)
        self.paths[path] = self._spec(tar, member, path)

    def _spec(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> Spec:
        if member.islnk():
            target = self.paths.get(_norm(member.linkname))
            if target is None or target.kind == "dir":
                raise FormatError(f"hard link {path!r} to missing {member.linkname!r}")
            return target
        kinds = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char",
                 tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
        kind = "reg" if member.isreg() else kinds.get(member.type)
        if kind is None:
            raise FormatError(f"tar entry {path!r} of unsupported type {member.type!r}")
        mtime = int(member.mtime)
        spec = Spec(path, kind, member.mode & 0o7777, uid=member.uid, gid=member.gid,
                    mtime=mtime, mtime_nsec=int((member.mtime - mtime) * 1e9),
                    xattrs={k[len(_XATTR):]: v.encode("utf-8", "surrogateescape")
                            for k, v in member.pax_headers.items() if k.startswith(_XATTR)})
        if kind == "reg":
            f = tar.extractfile(member)
            spec.data = f.read() if f is not None else b""
        elif kind == "symlink":
            spec.target = member.linkname.encode("utf-8", "surrogateescape")
        elif kind in ("char", "block"):
            spec.rdev = (member.devmajor, member.devminor)
        return spec

    def specs(self) -> list[Spec]:
        """The tree as specs (a second name of a shared Spec becomes a hardlink)."""
        first: dict[int, str] = {}
        out = []
        for path, spec in self.paths.items():
            seen = first.setdefault(id(spec), path)
            if seen != path:
                out.append(Spec(path, "hardlink", link=seen))
            else:
                spec.path = path
                out.append(spec)
        return out


def decompress(data: bytes) -> bytes:
    """A layer blob as a plain tar (gzip and zstd sniffed by magic)."""
    if data[:2] == b"\x1f\x8b":
        import gzip

        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise FormatError(f"corrupt gzip layer: {exc}") from None
    if data[:4] == b"\x28\xb5\x2f\xfd":
        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as exc:
            raise FormatError(f"corrupt zstd layer: {exc}") from None
    return data


async def image_specs(ref: str, hosts: HostsConfig, bar: Bar) -> list[Spec]:
    """The image's root filesystem (see the module docstring)."""
    import hashlib

    from snapshotter.registry.registry import RegistryClient

    client = RegistryClient(hosts)
    try:
        _, _, body = await client.get_manifest(ref)
        manifest: Any = json.loads(body)
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(layers, list):
            raise FormatError(f"{ref}: the manifest lists no layers")
        if any("nydus" in str(d.get("mediaType", "")) for d in layers):
            raise FormatError(f"{ref} is already a nydus image")
        bar.start("pull", sum(int(d.get("size", 0)) for d in layers))
        root = RootFS()
        for desc in layers:
            fetcher = client.open_blob(ref, str(desc["digest"]))
            size = await fetcher.size()
            parts = [(o, min(o + PIECE, size)) for o in range(0, size, PIECE)]
            data = b"".join(await fetcher.fetch(parts)) if parts else b""
            if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
                raise DigestMismatch(f"layer {desc['digest']} does not match its digest")
            bar.advance(size)
            root.apply(decompress(data))
        bar.finish()
        return root.specs()
    finally:
        await client.aclose()
