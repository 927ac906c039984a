#!/usr/bin/env bash
# The main job on a fresh Debian machine (root): installs what is needed, then runs
# lazysnap behind a containerd it configures and pulls and runs a demo image lazily.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec python3 scripts/demo.py "$@"
