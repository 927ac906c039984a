"""Spawns, supervises and restarts the FUSE daemons that serve remote layers."""
