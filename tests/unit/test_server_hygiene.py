"""Socket hygiene, error mapping and start-up checks."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest

from snapshotter import errdefs
from snapshotter.api.errors import status_code
from snapshotter.api.server import prepare_socket_path
from snapshotter.app import prepare_root


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # bound but nobody listens: stale
    prepare_socket_path(path)
    assert not Path(path).exists()


def test_live_socket_is_not_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen()
    try:
        with pytest.raises(errdefs.StartupError, match="in use"):
            prepare_socket_path(path)
        assert Path(path).exists()
    finally:
        s.close()


def test_regular_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("data")
    with pytest.raises(errdefs.StartupError, match="not a socket"):
        prepare_socket_path(str(path))


def test_socket_directory_is_created_private(tmp_path: Path) -> None:
    prepare_socket_path(str(tmp_path / "run" / "s.sock"))
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700


def test_root_is_created_private_and_probed(tmp_path: Path) -> None:
    prepare_root(str(tmp_path / "root"), check_overlay=True)
    assert (tmp_path / "root").stat().st_mode & 0o777 == 0o700
    assert list((tmp_path / "root").iterdir()) == []


def test_unwritable_root_fails_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(errdefs.StartupError, match="not usable"):
        prepare_root(str(blocker / "root"), check_overlay=False)


@pytest.mark.parametrize(("err", "code"), [
    (errdefs.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errdefs.BlobNotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errdefs.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
    (errdefs.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errdefs.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errdefs.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (errdefs.Unimplemented("x"), grpc.StatusCode.UNIMPLEMENTED),
    (errdefs.Internal("x"), grpc.StatusCode.INTERNAL),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
])
def test_error_codes(err: BaseException, code: grpc.StatusCode) -> None:
    assert status_code(err) == code
