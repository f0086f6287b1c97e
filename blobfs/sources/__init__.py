"""Sources: a Supervisely project described as records (datasets, files), plus their bytes.

A source knows where a project lives (a local folder, a remote instance) but nothing of
FUSE or of the directory tree the mount shows; :mod:`blobfs.view` builds that tree.
"""
