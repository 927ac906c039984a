"""Entry point of a FUSE daemon process::

    python -m snapshotter.fs --mode dedicated|shared --mountpoint DIR \\
        --control SOCKET --config JSONFILE [--control-fd N]

``--config`` is the JSON described by ``daemonapi.specs.DaemonSpec.from_json``. ``--control-fd``
names an inherited, already-listening unix socket to serve (socket activation); the
daemon then does not bind ``--control`` itself (the path still identifies it).

The daemon leaves its caller's session when it is not a session leader already (the
manager starts it with ``setsid``). Logs go to stderr, one line per event.

Exit status: 0 after a clean shutdown (SIGTERM, SIGINT, control ``shutdown`` or an
external unmount), 1 when start-up fails, 2 for a bad command line or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from snapshotter.errdefs import ConfigError, LazysnapError

if TYPE_CHECKING:
    from snapshotter.daemonapi.specs import DaemonSpec
    from snapshotter.fs.layers import BlobSource
    from snapshotter.metrics.counters import DaemonCounters, RegistryCounters
    from snapshotter.registry.base import BlobFetcher

log = logging.getLogger("snapshotter.fs")

# An SSL_CERT_FILE that names no file: OpenSSL then loads no CA bundle into a new context.
_NO_CA_FILE = "/nonexistent/lazysnap/no-ca-bundle.pem"


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def import_runtime() -> None:
    """Import aiohttp without two costs a daemon never uses. Each daemon is a process of
    its own, so these are paid per layer (dedicated mode); together a few MiB of resident
    memory and tens of milliseconds of start-up:

    * frozenlist's compiled extension is C++ and loads libstdc++ only for aiohttp's
      signal lists; the pure-Python frozenlist (``FROZENLIST_NO_EXTENSIONS``) is
      the same type.
    * aiohttp builds two default TLS contexts when imported, each parsing the whole CA
      bundle. They are built here with no bundle file (``SSL_CERT_FILE`` names none
      while aiohttp is imported; ``SSL_CERT_DIR``, read lazily, still applies), and the
      registry transport never uses them: it passes its own verifying context, built
      with the real environment on the first https request
      (``snapshotter.registry.transport.tls_context``).

    The environment is restored afterwards. Idempotent.
    """
    if "aiohttp" not in sys.modules:
        with _environ(FROZENLIST_NO_EXTENSIONS="1", SSL_CERT_FILE=_NO_CA_FILE):
            import aiohttp  # noqa: F401


class _RegistrySource:
    """``BlobSource`` over the registry client built from the ``registry`` config table;
    the client counts into ``counters`` (published in the daemon's status)."""

    def __init__(self, table: Mapping[str, Any], counters: RegistryCounters) -> None:
        from snapshotter.registry.hosts import HostsConfig
        from snapshotter.registry.registry import RegistryClient

        self._client = RegistryClient(
            HostsConfig.from_dict(table), stats=counters.stats,
            session_factory=counters.session_factory,
        )

    async def open_blob(self, ref: str, digest: str, size: int | None = None) -> BlobFetcher:
        return self._client.open_blob(ref, digest, size)

    async def aclose(self) -> None:
        await self._client.aclose()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from snapshotter.daemonapi.enums import DaemonMode

    p = argparse.ArgumentParser(prog="python -m snapshotter.fs", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=[str(m) for m in DaemonMode], required=True)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--control", required=True, help="control socket path")
    p.add_argument("--control-fd", type=int, default=None, help="inherited listening socket")
    p.add_argument("--config", required=True, help="daemon configuration JSON file")
    return p.parse_args(argv)


def _load_config(path: str, mode: str) -> DaemonSpec:
    from snapshotter.daemonapi.specs import DaemonSpec

    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read daemon config {path}: {exc}") from exc
    return DaemonSpec.from_json(raw, mode)


def _inherited_socket(fd: int | None) -> socket.socket | None:
    if fd is None:
        return None
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


async def _run(
    args: argparse.Namespace, config: DaemonSpec, source: BlobSource, counters: DaemonCounters
) -> None:
    from snapshotter.fs.daemon import Daemon

    daemon = Daemon(
        config,
        mode=args.mode,
        mountpoint=args.mountpoint,
        control_path=args.control,
        source=source,
        control_sock=_inherited_socket(args.control_fd),
        counters=counters,
    )
    await daemon.run()


def limit_memory(limit_bytes: int) -> None:
    """Cap this process's data memory (``RLIMIT_DATA``: heap and other private writable
    mappings, not the shared libraries or the address space thread arenas only reserve)
    at ``limit_bytes`` (0: leave it). Past it allocations fail: a layer whose index needs
    more is refused with ``resource_limit`` while the other layers keep serving, and the
    node's memory is safe from one hostile layer. A hard limit lower than the one asked
    for wins; a limit the kernel refuses is logged and left."""
    if limit_bytes <= 0:
        return
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and hard < limit_bytes:
        limit_bytes = hard
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot limit the daemon's memory to %d bytes: %s", limit_bytes, exc)


def main(argv: Sequence[str] | None = None) -> int:
    import_runtime()  # first: before anything imports aiohttp
    import asyncio

    from snapshotter.metrics.counters import DaemonCounters

    args = _parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    try:
        config = _load_config(args.config, args.mode)
        logging.getLogger().setLevel(config.log_level)
        counters = DaemonCounters()
        source = _RegistrySource(config.registry, counters.registry)
    except LazysnapError as exc:
        log.error("%s", exc)
        return 2
    with contextlib.suppress(PermissionError):
        os.setsid()  # EPERM: already a session (or group) leader, as the manager starts us
    limit_memory(config.memory_limit_bytes)
    gc.freeze()  # the imported modules live as long as the daemon: out of the collector's way
    try:
        asyncio.run(_run(args, config, source, counters))
    except LazysnapError as exc:
        log.error("daemon failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
