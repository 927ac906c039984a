"""``python -m snapshotter`` runs the ``lazysnap`` command line."""

import sys

from snapshotter.cli import main

sys.exit(main())
