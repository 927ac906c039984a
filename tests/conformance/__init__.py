"""Black-box conformance suite: the real ``python -m snapshotter serve`` over a unix socket.

Ports the behaviours of containerd's snapshotter test suite (``snapshots/testsuite``, 1.6)
plus the error contract of containerd's bolt storage (protocol-reference §1.6). Every test
gets a fresh service on a fresh root under ``/tmp``; file contents are checked through real
bind and overlay mounts, so the suite needs root and overlayfs.
"""
