"""``lazysnap inspect``: files, registry blobs (read by range) and usage errors."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from pathlib import Path

from snapshotter.tools.inspect.cli import add_arguments, run
from tests.estargz_writer import build_estargz, reg
from tests.fakeregistry import FakeRegistry

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nydus"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(_args(*argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_rafs_bootstrap_file() -> None:
    code, out, _ = _run(str(FIXTURES / "rafs-v5-sha256-nocompress" / "bootstrap"))
    assert code == 0
    assert json.loads(out)["format"] == "rafs-v5"


def test_usage_errors() -> None:
    assert _run()[0] == 2
    assert _run("--ref", "127.0.0.1:1/x:y")[0] == 2
    assert _run("file", "--ref", "r", "--digest", "sha256:" + "0" * 64)[0] == 2


def test_estargz_layer_in_a_registry_is_read_by_range(tmp_path: Path) -> None:
    blob = build_estargz([reg("a.txt", b"hello"), reg("big", b"x" * 300_000)])

    async def serve_and_inspect() -> tuple[int, str, list[str]]:
        fake = await FakeRegistry().start()
        try:
            digest = fake.put_blob("lib/img", blob.blob)
            ref = f"{fake.host}/lib/img:v1"
            args = _args("--ref", ref, "--digest", digest, "--toc-digest", blob.toc_digest,
                         "--tree")
            out, err = io.StringIO(), io.StringIO()
            code = await asyncio.to_thread(run, args, out, err)
            ranges = [r.headers.get("Range", "") for r in fake.requests if "/blobs/" in r.path]
            return code, out.getvalue() + err.getvalue(), ranges
        finally:
            await fake.aclose()

    code, out, ranges = asyncio.run(serve_and_inspect())
    assert code == 0, out
    tree = json.loads(out)
    assert [e["name"] for e in tree[0]["contents"]] == ["a.txt", "big"]
    assert ranges and all(r.startswith("bytes=") for r in ranges if r)
