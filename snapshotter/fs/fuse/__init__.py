"""The FUSE protocol, in a daemon: wire layouts, the session on /dev/fuse, passthrough
bookkeeping, kernel knobs.
"""
