"""The Supervisely blob project format: offsets pickles, tar blobs, annotation coordinates and
image sizes, read, checked and written.

Nothing here knows of a mount, a cache or a server: files are reached only through
:mod:`blobfs.safe_open` (never outside their project), so the sources, the writeback
importers and the commands share one definition of what a project's bytes mean.
"""
