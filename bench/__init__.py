"""lazysnap's benchmark: ``python -m bench`` (see docs/benchmarks.md).

Modules: ``cli`` (flags, orchestration), ``images`` (images built once and cached),
``wan`` and ``delayproxy`` (the emulated WAN link), ``env`` (registry, lazysnap and
containerd as one running system), ``runners`` and ``fsfigures`` (the figures),
``snapshots_api`` (containerd's Snapshots API), ``stats`` and ``report`` (pure: medians,
targets, table, JSON).
"""
