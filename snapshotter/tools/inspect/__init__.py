"""``lazysnap inspect``: eStargz blobs and RAFS bootstraps."""
