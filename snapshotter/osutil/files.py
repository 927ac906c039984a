"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def write_atomically(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary name in the same directory and
    rename it into place, so that a reader (or a crash) never sees half a file. With
    ``fsync`` the data reaches the disk before the rename. Raises OSError; the temporary
    file is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomically(path: str | Path, value: Any) -> None:
    """``write_atomically`` of ``value`` as indented, key-sorted JSON (no fsync: these
    files are rebuilt from the metastore after a crash)."""
    write_atomically(path, json.dumps(value, indent=1, sort_keys=True).encode(), fsync=False)
