"""The contract between `lazysnap serve` and its FUSE daemons, declared once.

Everything that crosses from the snapshotter to a daemon process is here, typed and
frozen: the daemon's start-up spec (``specs.DaemonSpec``) and each layer's
(``specs.LayerSpec``), built from ``Config`` in one place (``specs.daemon_spec``,
``specs.layer_settings``); the enums both sides spell (``enums``); the one table of
fallback reasons (``reasons``); the status a daemon reports (``status``); the control
protocol (``protocol``) and its typed client (``client``).

May import: ``snapshotter.errdefs``, ``snapshotter.config`` (for defaults), and
``snapshotter.formats.limits``. Imported by the snapshotter side (``lazy``,
``daemon_manager``, ``tools``) and by the daemon (``fs``); it imports neither.
"""
