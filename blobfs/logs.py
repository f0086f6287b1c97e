"""Logging set-up shared by the CLI commands."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str = "INFO", log_file: str | None = None) -> None:
    """Plain lines under systemd (journald stamps them), timestamps elsewhere."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM")) and log_file is None
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if under_journal
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # urllib3 would log full URLs with query strings at DEBUG; keep it at WARNING.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
