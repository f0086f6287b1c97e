"""Writeback: files written into the mount are staged durably, packed into blobs and imported.

``spool`` keeps staged files crash-safe on disk, ``queue`` decides when to pack and retries,
``importer`` turns one batch into a new blob in the project (local folder or remote).
"""
