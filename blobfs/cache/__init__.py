"""Caches between sources and transports: byte ranges of blobs (and, remotely, metadata)."""
