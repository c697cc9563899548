"""What the commands of ``data/`` and ``train/`` share, apart from the installable library.

``storage``: local folders and object-store URLs (atomic writes, staging, locks); ``cli``: the
conventions of every command line (one-line errors, ``--debug``, overrides, meshes).
"""
