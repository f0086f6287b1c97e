"""Where the server address and API token come from, as the SDK finds them.

Order: ``--server`` / ``--token-file`` flags, then the ``SERVER_ADDRESS`` / ``API_TOKEN``
environment variables, then ``~/supervisely.env`` (``KEY="value"`` lines). The token is
returned to the caller and nowhere else: no log line, argv or message contains it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from blobfs.errors import InvalidInput

logger = logging.getLogger(__name__)

ENV_FILE = Path("~/supervisely.env")
#: The environment variable of the token.
TOKEN_ENV = "API_TOKEN"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines (quotes optional, ``#`` comments) of a dotenv file."""
    values: dict[str, str] = {}
    try:
        text = path.expanduser().read_text()
    except OSError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        values[key] = value.strip().strip("'\"")
    return values


def resolve(
    server: str | None = None,
    token_file: str | None = None,
    env: dict[str, str] | None = None,
    env_file: Path = ENV_FILE,
) -> tuple[str, str]:
    """Return ``(server, token)``.

    Raises:
        InvalidInput: one of them cannot be found (the message names where it looked).
    """
    environ = os.environ if env is None else env
    from_file = read_env_file(env_file)
    server = server or environ.get("SERVER_ADDRESS") or from_file.get("SERVER_ADDRESS")
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read token file {token_file}: {exc.strerror}") from None
        warning = token_file_warning(token_file)
        if warning:
            logger.warning("%s", warning)
    else:
        token = environ.get(TOKEN_ENV) or from_file.get(TOKEN_ENV) or ""
    if not server:
        raise InvalidInput("no server: pass --server or set SERVER_ADDRESS (or ~/supervisely.env)")
    if not token:
        raise InvalidInput(
            "no API token: pass --token-file or set API_TOKEN (or ~/supervisely.env)"
        )
    if not server.startswith(("http://", "https://")):
        server = "https://" + server
    return server.rstrip("/"), token


def token_file_warning(token_file: str) -> str | None:
    """What to tell the user when others may read ``token_file`` (as ssh does for keys).

    The token is still used: refusing would break a working mount over a mode. Only the
    path and its mode are named, never the content.
    """
    path = Path(token_file).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None
    return (
        f"token file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}): "
        f"anyone who can read it can use the token; run chmod 600 {path}"
    )
