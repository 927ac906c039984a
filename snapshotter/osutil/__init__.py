"""Operating-system plumbing shared by serve and the daemons: mounts."""
