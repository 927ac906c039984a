"""``lazysnap convert``: turn a directory (or an OCI image) into a nydus image and push it.

Usage::

    lazysnap convert --format rafs-v6|rafs-v5 [--chunk-size BYTES] [--compression C]
        [--digest sha256|blake3] [--prefetch PATH ...] [--output DIR] [--insecure HOST ...]
        [--docker-config FILE] [--arch ARCH] [--cmd COMMAND]
        (SOURCE_DIR | --from-image REF) TARGET_REF

The source is read whole (``scan.py``; for ``--from-image``, ``ociimage.py`` applies
the image's layers), written as one RAFS bootstrap + one data blob (``write_v5`` /
``write_v6``), wrapped as a nydus image (``image.py``) and pushed (``push.py``).
``--output DIR`` also writes ``DIR/image.boot`` and ``DIR/blobs/<blob id>``. Progress
goes to stderr: a redrawn bar on a terminal, one line per phase otherwise. The last line
on stdout is the pushed manifest's digest.

Exit status (``run``): 0 pushed, 1 conversion or registry failure (one error line on
stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

from snapshotter.daemonapi.enums import LayerFormat
from snapshotter.errdefs import InvalidArgument, LazysnapError
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.platforms import current_platform
from snapshotter.registry.reference import parse_reference
from snapshotter.tools.convert import image as imagemod
from snapshotter.tools.convert import scan as scanmod
from snapshotter.tools.convert.push import push_image
from snapshotter.tools.convert.tree import DEFAULT_CHUNK_SIZE, Image, Spec
from snapshotter.tools.convert.write_v5 import write_v5
from snapshotter.tools.convert.write_v6 import write_v6

FORMATS = (LayerFormat.RAFS_V6.value, LayerFormat.RAFS_V5.value)
DEFAULT_COMPRESSION = {LayerFormat.RAFS_V6.value: "zstd", LayerFormat.RAFS_V5.value: "lz4_block"}


class ProgressBar:
    """A byte-count progress bar on ``stream`` for one phase at a time.

    On a terminal the bar is redrawn at most ten times a second; otherwise only the
    phase's final line is printed, so logs stay readable.
    """

    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.phase, self.total, self.done, self._drawn = "", 0, 0, 0.0

    def start(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done, self._drawn = phase, total, 0, 0.0
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        if self.tty:
            self._draw(force=True)
        self.stream.write("\n" if self.tty else self._line() + "\n")
        self.stream.flush()

    def _line(self) -> str:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * self.WIDTH)
        return (f"{self.phase:<10} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{frac * 100:5.1f}% {self.done / 2**20:8.1f}/{self.total / 2**20:.1f} MiB")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        self.stream.write("\r" + self._line())
        self.stream.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` subcommand's arguments to ``parser``."""
    parser.add_argument("--format", choices=FORMATS, default=LayerFormat.RAFS_V6.value,
                        help="RAFS version of the bootstrap (default rafs-v6)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="chunk size in bytes, a power of two in 4 KiB..16 MiB "
                             "(default 1 MiB)")
    parser.add_argument("--compression", choices=("zstd", "lz4_block", "none"),
                        help="chunk compression (default zstd for v6, lz4_block for v5)")
    parser.add_argument("--digest", choices=("blake3", "sha256"), default="blake3",
                        help="chunk digest algorithm (default blake3)")
    parser.add_argument("--prefetch", action="append", default=[], metavar="PATH",
                        help="a file or directory to list in the prefetch table (repeatable)")
    parser.add_argument("--output", metavar="DIR",
                        help="also write the bootstrap and blob to DIR")
    parser.add_argument("--insecure", action="append", default=[], metavar="HOST",
                        help="push to HOST over plain HTTP (loopback hosts always are)")
    parser.add_argument("--docker-config", metavar="FILE",
                        help="docker config.json with registry credentials")
    parser.add_argument("--arch", default=None,
                        help="image architecture (default: this machine's)")
    parser.add_argument("--cmd", default=None, metavar="COMMAND",
                        help="the image's default command, split like a shell would")
    parser.add_argument("--from-image", metavar="REF",
                        help="convert this OCI image (pulled from its registry) instead of "
                             "a directory")
    parser.add_argument("source", nargs="?", help="directory to convert")
    parser.add_argument("target", help="image reference to push to, e.g. "
                                       "127.0.0.1:5000/app:nydus")


def write_image(specs: list[Spec], args: argparse.Namespace) -> Image:
    """The RAFS image of ``specs`` as ``args`` asks (InvalidArgument for bad options)."""
    compression = args.compression or DEFAULT_COMPRESSION[args.format]
    prefetch = tuple(args.prefetch)
    writer = write_v6 if args.format == LayerFormat.RAFS_V6 else write_v5
    return writer(specs, chunk_size=args.chunk_size, compression=compression,
                  digest=args.digest, prefetch=prefetch, blob_trailer=True)


def _save(rafs: Image, out: str) -> None:
    blobs = Path(out) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (Path(out) / "image.boot").write_bytes(rafs.bootstrap)
    for blob_id, data in rafs.blobs.items():
        (blobs / blob_id).write_bytes(data)


async def _source_specs(args: argparse.Namespace, bar: ProgressBar,
                        hosts: HostsConfig) -> list[Spec]:
    if args.from_image:
        from snapshotter.tools.convert.ociimage import image_specs

        return await image_specs(args.from_image, hosts, bar)
    if not args.source:
        raise InvalidArgument("give a source directory or --from-image")
    total = sum(e.stat(follow_symlinks=False).st_size
                for e in _walk_files(args.source))
    bar.start("scan", total)
    specs = await asyncio.to_thread(scanmod.scan, args.source, bar.advance)
    bar.finish()
    return specs


def _walk_files(root: str) -> list[os.DirEntry[str]]:
    out: list[os.DirEntry[str]] = []
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    out.append(entry)
    return out


async def convert(args: argparse.Namespace, bar: ProgressBar) -> str:
    """Do the conversion and push; return the manifest digest. Raises LazysnapError."""
    ref = parse_reference(args.target)
    hosts = HostsConfig.from_dict({"insecure": list(args.insecure)})
    credentials = CredentialStore.from_docker_config(args.docker_config) \
        if args.docker_config else None
    specs = await _source_specs(args, bar, hosts)
    bar.start("build", 1)
    rafs = await asyncio.to_thread(write_image, specs, args)
    bar.finish()
    if args.output:
        _save(rafs, args.output)
    arch = args.arch or current_platform().architecture
    built = imagemod.nydus_image(rafs.bootstrap, rafs.blobs, args.format[-1],
                                 architecture=arch,
                                 cmd=shlex.split(args.cmd) if args.cmd else None)
    bar.start("push", sum(len(x.data) for x in built.layers) + len(built.config))
    digest = await push_image(built, ref, hosts, credentials=credentials,
                              progress=bar.advance)
    bar.finish()
    return digest


def run(args: argparse.Namespace) -> int:
    """Run ``lazysnap convert``; see the module docstring for the exit status."""
    if args.source and args.from_image:
        print("lazysnap convert: give either a source directory or --from-image",
              file=sys.stderr)
        return 2
    bar = ProgressBar(sys.stderr)
    try:
        digest = asyncio.run(convert(args, bar))
    except InvalidArgument as exc:
        print(f"lazysnap convert: {exc}", file=sys.stderr)
        return 2
    except (LazysnapError, OSError) as exc:
        print(f"lazysnap convert: {exc}", file=sys.stderr)
        return 1
    print(digest)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m snapshotter.tools.convert.cli`` (the same as ``lazysnap convert``)."""
    parser = argparse.ArgumentParser(prog="lazysnap convert", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
