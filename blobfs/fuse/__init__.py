"""The FUSE boundary: the only package that imports the FUSE bindings (with daemon.py)."""
