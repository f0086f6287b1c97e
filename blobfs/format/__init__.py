"""The Supervisely blob format: tar blobs and their ``*_offsets.pkl`` indexes (no FUSE, no HTTP)."""
