"""The gRPC server on a unix socket, with the socket hygiene containerd users expect.

* The socket's directory is created 0700 when missing; the socket itself is 0600.
* A stale socket (nothing accepts on it) is replaced; a live one makes start-up fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

import grpc

from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.service import SnapshotsService
from snapshotter.errdefs import StartupError

MAX_MESSAGE = 16 << 20


def prepare_socket_path(path: str) -> None:
    """Make ``path`` ready to bind: directory present, stale socket gone.

    Raises StartupError when the path is taken by a live socket or by a non-socket.
    """
    sock = Path(path)
    if not sock.parent.exists():
        sock.parent.mkdir(mode=0o700, parents=True)
        os.chmod(sock.parent, 0o700)
    try:
        st = sock.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot check socket {path}: {e.strerror}") from None
        sock.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartupError(f"{path} is in use by a live process (is another lazysnap running?)")


async def start_server(service: SnapshotsService, path: str) -> grpc.aio.Server:
    """Start serving ``service`` on unix socket ``path``; return the running server."""
    prepare_socket_path(path)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ])
    pb_grpc.add_SnapshotsServicer_to_server(service, server)
    old_umask = os.umask(0o077)
    try:
        server.add_insecure_port(f"unix:{path}")
        await server.start()
    except Exception as e:
        raise StartupError(f"cannot listen on {path}: {e}") from e
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


async def stop_server(server: grpc.aio.Server, path: str, grace: float = 5.0) -> None:
    """Stop accepting calls, let running ones finish for ``grace`` seconds, remove socket."""
    await server.stop(grace)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


