"""The nydus converter: RAFS v5/v6 bootstrap and blob writers, image assembly, push.

* ``tree.py``: the input (``Spec`` list), the data blob builder, shared records;
* ``write_v5.py`` / ``write_v6.py``: the bootstrap writers (read back by
  ``snapshotter.formats.rafs``, laid out as nydus-image does);
* ``scan.py``: a local directory as specs; ``ociimage.py``: an OCI image's root
  filesystem as specs;
* ``image.py``: blob layers + bootstrap layer + config + manifest with the nydus
  annotations (protocol-reference §5.1); ``push.py``: upload to a registry;
* ``cli.py``: ``lazysnap convert`` (``add_arguments`` + ``run``).
"""
