"""The ``lazysnap`` command line: serve, config, status, version (and more subcommands).

Flags override the configuration file. Exit codes: 0 success, 1 runtime failure,
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence

from snapshotter import __version__
from snapshotter import config as configmod
from snapshotter.errdefs import ConfigError, LazysnapError, StartupError
from snapshotter.tools.status import add_status_arguments, run_status

log = logging.getLogger("lazysnap")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"configuration file (default {configmod.DEFAULT_CONFIG_PATH} if present)")
    p.add_argument("--address", metavar="SOCKET", help="unix socket to serve containerd on")
    p.add_argument("--root", metavar="DIR", help="state directory")
    p.add_argument("--log-level", choices=configmod.LOG_LEVELS, help="log level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazysnap", description="containerd remote snapshotter with lazy pulling")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the containerd Snapshots API")
    _add_config_flags(serve)
    show = sub.add_parser("config", help="print the effective configuration as TOML")
    _add_config_flags(show)
    status = sub.add_parser(
        "status", help="show snapshots, daemons and cache usage (exit 1 if a remote"
        " snapshot's daemon is down)")
    _add_config_flags(status)
    add_status_arguments(status)
    sub.add_parser("version", help="print the version")
    from snapshotter.tools.inspect.cli import add_arguments as add_inspect_arguments

    inspect = sub.add_parser(
        "inspect", help="describe an eStargz blob or a RAFS bootstrap (file or registry)")
    add_inspect_arguments(inspect)
    from snapshotter.tools.convert.cli import add_arguments as add_convert_arguments

    convert = sub.add_parser(
        "convert", help="convert a directory or OCI image to a nydus image and push it")
    add_convert_arguments(convert)
    return parser


def effective_config(args: argparse.Namespace) -> configmod.Config:
    cfg = configmod.load(args.config)
    return cfg.with_overrides(root=args.root, address=args.address, log_level=args.log_level)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # grpc's own debug chatter (event loop bookkeeping) drowns the service's lines.
    logging.getLogger("grpc").setLevel(max(logging.INFO, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"lazysnap {__version__}")
        return 0
    if args.command == "inspect":
        from snapshotter.tools.inspect.cli import run as run_inspect

        return run_inspect(args)
    if args.command == "convert":
        from snapshotter.tools.convert.cli import run as run_convert

        return run_convert(args)
    try:
        cfg = effective_config(args)
    except ConfigError as e:
        print(f"lazysnap: configuration error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(configmod.to_toml(cfg))
        return 0
    if args.command == "status":
        return run_status(cfg, as_json=args.json, timeout=args.timeout)
    setup_logging(cfg.log_level)
    from snapshotter.app import App

    try:
        # Everything imported so far lives as long as the process: keep the collector
        # from walking it again and again (each full pass costs ~10 ms per Prepare here).
        gc.freeze()
        asyncio.run(App(cfg).run())
    except StartupError as e:
        log.error("cannot start: %s", e)
        return 1
    except LazysnapError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
