"""lazysnap: a containerd proxy snapshotter that mounts eStargz and nydus layers lazily."""

__version__ = "0.1.0"
