"""Test support shipped with blobfs: an emulator of the Supervisely REST API.

Nothing in the mount itself imports this package; it exists so tests, benchmarks and users
can run ``blobfs mount sly://...`` against a server on 127.0.0.1 without a real instance.
"""
