"""One behaviour suite run in-process and through a real mount (see fs.py)."""
