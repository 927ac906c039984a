"""The read path, in a daemon: chunk reader, read-ahead, amplification, directory read-ahead,
whole files, fetch policy.
"""
