"""Generate the Python gRPC code for the containerd protos into snapshotter/_proto/.

Usage: ``python protos/generate.py [OUT_DIR]`` (default: snapshotter/_proto next to this
directory). The generated modules import each other as ``containerd.*``; they are rewritten
to ``snapshotter._proto.containerd.*`` so the vendored tree never shadows anything on
sys.path. tests/unit/test_protos.py regenerates into a temporary directory and fails when
the checked-in code differs (the grpcio-tools version is pinned in pyproject.toml).
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

PROTOS = [
    "containerd/types/mount.proto",
    "containerd/services/snapshots/v1/snapshots.proto",
]
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "snapshotter" / "_proto"
_IMPORT = re.compile(r"^from containerd(\.[\w.]+)? import ", re.MULTILINE)


def generate(out: Path) -> None:
    """Run protoc (from grpcio-tools) and rewrite imports; raise RuntimeError on failure."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = _IMPORT.sub(
            lambda m: f"from snapshotter._proto.containerd{m.group(1) or ''} import ",
            path.read_text(),
        )
        path.write_text(text)
    for directory in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
