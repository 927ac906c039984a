"""What a FUSE daemon process imports before it serves anything (``python -m
snapshotter.fs``), and the registry transport's own TLS context.

Every dedicated daemon is a process of its own, so each module it imports is paid once per
layer; these tests pin the import graph, not any size or time.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yarl import URL

from snapshotter.registry import transport
from snapshotter.registry.auth import CredentialStore
from snapshotter.registry.hosts import HostsConfig
from snapshotter.registry.transport import RegistryStats, Transport

REPO = Path(__file__).resolve().parents[2]

# Imported the way ``main`` does it, then everything the daemon needs to serve a layer.
_PROBE = """
import json, os, sys
before = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "FROZENLIST_NO_EXTENSIONS")}
from snapshotter.fs.__main__ import import_runtime
import_runtime()
import snapshotter.fs.daemon, snapshotter.fs.fuse.session, snapshotter.fs.ops
import snapshotter.metrics.counters, snapshotter.registry.hosts, snapshotter.registry.registry
after = {k: os.environ.get(k) for k in before}
print(json.dumps({"modules": sorted(sys.modules), "env_restored": before == after}))
"""

# Never needed by a daemon before it serves: the gRPC/protobuf edge and Prometheus live in
# ``lazysnap serve``; the nydus codecs are imported when a nydus chunk is decoded; the
# daemon speaks the FUSE protocol itself (``fs.fusesession``), so no FUSE binding (pyfuse3)
# nor its trio loop; hypothesis is a test dependency.
_NOT_IMPORTED = (
    "grpc", "google.protobuf", "prometheus_client", "hypothesis", "sqlite3", "tomllib",
    "zstandard", "lz4", "blake3", "pyfuse3", "trio",
)


def _probe(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_daemon_import_graph_leaves_out_what_serving_does_not_need() -> None:
    got = _probe()
    modules = set(got["modules"])
    assert "snapshotter.fs.fuse.session" in modules
    assert not modules & set(_NOT_IMPORTED)
    assert not any(m.startswith(("grpc.", "prometheus_client.", "trio.", "pyfuse3."))
                   for m in modules)
    # pure-Python frozenlist: its compiled extension would load libstdc++
    assert "frozenlist" in modules and "frozenlist._frozenlist" not in modules
    assert got["env_restored"]


def test_the_daemon_needs_no_fuse_binding_at_all() -> None:
    """Starting the real entry point with a bad configuration gets as far as reading it
    (every import done) without pyfuse3 or trio, even where they are installed: a
    meta-path finder makes importing either fail in that process."""
    code = (
        "import sys\n"
        "class NoBinding:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pyfuse3', 'trio'):\n"
        "            raise ImportError('the daemon must not import ' + name)\n"
        "sys.meta_path.insert(0, NoBinding())\n"
        "from snapshotter.fs.__main__ import main\n"
        "import snapshotter.fs.daemon, snapshotter.fs.fuse.session\n"
        "sys.exit(main(['--mode', 'shared', '--mountpoint', '/nonexistent', '--control',\n"
        "               '/nonexistent/c.sock', '--config', '/nonexistent/c.json']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 2, out.stderr  # a configuration error, not an ImportError
    assert "cannot read daemon config" in out.stderr
    assert "ImportError" not in out.stderr


def test_import_runtime_restores_a_set_environment() -> None:
    got = _probe({"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
                  "FROZENLIST_NO_EXTENSIONS": ""})
    assert got["env_restored"]


def test_tls_context_verifies_and_is_built_once() -> None:
    ctx = transport.tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert transport.tls_context() is ctx


class _Resp:
    status = 204
    headers: Mapping[str, str] = {}
    url = URL("http://x/")

    async def __aenter__(self) -> _Resp:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Session:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def request(self, method: str, url: URL, **kwargs: Any) -> _Resp:
        self.calls.append({"url": url, **kwargs})
        return _Resp()

    async def close(self) -> None:
        return None


async def test_https_requests_carry_the_transport_tls_context() -> None:
    session = _Session()
    t = Transport(HostsConfig.from_dict({}), CredentialStore(), RegistryStats(),
                  session_factory=lambda: session)  # type: ignore[arg-type,return-value]
    for url in ("https://registry.example/v2/", "http://127.0.0.1:5000/v2/"):
        await t.send("manifest", "HEAD", URL(url), {}, lambda *_: 0)
    assert session.calls[0]["ssl"] is transport.tls_context()
    assert session.calls[1]["ssl"] is True
    await t.aclose()


def test_the_daemon_knows_the_rafs_formats_without_importing_their_reader() -> None:
    from snapshotter.fs import layers, rafs_opener

    assert set(layers.default_openers()) == {"estargz", *rafs_opener.FORMATS}
