"""The remote decision, in serve: whether and how a layer is mounted lazily (eStargz, nydus),
TOC look-ahead, bounded parsing.
"""
