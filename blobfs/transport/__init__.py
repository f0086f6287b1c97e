"""Byte transports: where blob bytes come from (a local file, HTTP). No caching here."""
