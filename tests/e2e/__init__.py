"""End-to-end tests: real containerd, a real registry, real mounts (root only).

The harness is split by concern: ``procs.py`` (waiting, child processes, mounts),
``harness.py`` (registry, containerd and lazysnap as managed processes), ``imagebuild.py``
(OCI images built in pure Python and pushed over the distribution API), ``imagetree.py``
(the tree an image should produce and how to observe one) and ``metastore_view.py`` (a
read-only view of lazysnap's sqlite metastore).
"""
