#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine (root): installs what is needed, runs the
# static checks, then every tier of tests, end-to-end ones included (real containerd,
# registry and FUSE; they fail, never skip, when a part is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
echo "== ruff";  python3 -m ruff check .
echo "== mypy";  python3 -m mypy snapshotter daemon_manager $( [ -d bench ] && [ -n "$(ls bench/*.py 2>/dev/null)" ] && echo bench )
echo "== pytest"
exec python3 -m pytest -p no:cacheprovider "$@" tests
