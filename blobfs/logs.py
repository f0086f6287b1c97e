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
        _private_file_handler(log_file) if log_file else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # urllib3 would log full URLs with query strings at DEBUG; keep it at WARNING.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _private_file_handler(path: str) -> logging.FileHandler:
    """A handler appending to ``path``, which is created ``0600`` when it does not exist.

    The log names project paths, images and servers; other users have no business reading
    it. The file is created before ``FileHandler`` opens it, so no umask makes it wider. An
    existing file keeps its mode: whoever made it group-readable (say, for a log reader's
    group) decided that.
    """
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
    return logging.FileHandler(path)
