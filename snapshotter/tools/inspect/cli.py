"""``lazysnap inspect``: a layer file (eStargz blob, RAFS bootstrap, nydus bootstrap tar)
or an eStargz layer in a registry (``--ref REF --digest DIGEST``, read by range: only the
footer and the TOC are fetched).

Exit codes: 0 success, 1 malformed layer or digest mismatch, 2 unreadable input or bad
usage, 3 registry failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import IO

from snapshotter import config as configmod
from snapshotter.errdefs import ConfigError, FormatError, InvalidArgument, RegistryError
from snapshotter.tools.inspect import estargz as estargz_inspect
from snapshotter.tools.inspect import rafs as inspect_rafs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The file arguments of ``inspect_rafs`` plus the registry source."""
    inspect_rafs.add_arguments(parser, file_optional=True)
    parser.add_argument("--ref", help="image reference of an eStargz layer in a registry")
    parser.add_argument("--digest", help="the layer's digest (with --ref)")
    parser.add_argument("--config", metavar="FILE",
                        help="lazysnap configuration for registry settings (with --ref)")


def run(args: argparse.Namespace, out: IO[str] | None = None,
        err: IO[str] | None = None) -> int:
    """Inspect a file or, with ``--ref``/``--digest``, a registry blob."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if args.ref is None and args.digest is None:
        if args.blob is None:
            print("lazysnap inspect: give FILE, or --ref and --digest", file=err)
            return 2
        return inspect_rafs.run(args, out, err)
    if args.blob is not None or not (args.ref and args.digest):
        print("lazysnap inspect: --ref and --digest go together, without FILE", file=err)
        return 2
    try:
        result = asyncio.run(_inspect_remote(args))
    except (FormatError, InvalidArgument) as exc:
        print(f"lazysnap inspect: {args.ref} {args.digest}: {exc}", file=err)
        return 1
    except ConfigError as exc:
        print(f"lazysnap inspect: {exc}", file=err)
        return 2
    except RegistryError as exc:
        print(f"lazysnap inspect: registry: {exc}", file=err)
        return 3
    json.dump(result["tree"] if args.tree else result, out, indent=2, ensure_ascii=False)
    out.write("\n")
    return 0


async def _inspect_remote(args: argparse.Namespace) -> dict[str, object]:
    from snapshotter.lazy.layers import registry_hosts
    from snapshotter.registry.registry import RegistryClient

    client = RegistryClient(registry_hosts(configmod.load(args.config)))
    try:
        fetcher = client.open_blob(args.ref, args.digest)
        return await estargz_inspect.inspect_fetcher(
            fetcher, expected_toc_digest=args.toc_digest,
            max_toc_bytes=args.max_toc_bytes, with_tree=args.tree)
    finally:
        await client.aclose()
