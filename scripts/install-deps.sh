#!/usr/bin/env bash
# Installs what lazysnap and its tests need on a Debian machine (root): the system packages
# (containerd, runc, a registry, ctr-remote, FUSE, ...) and the Python package with its
# development dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PKGS=(containerd runc docker-registry stargz-snapshotter fuse3
      umoci skopeo erofs-utils busybox-static prometheus iproute2 procps psmisc attr)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[dev]'
