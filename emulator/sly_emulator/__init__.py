"""An emulator of the Supervisely public REST API, standard library only.

It lets a client of that API (the SDK, blobfs, anything speaking HTTP) be tested against a
real HTTP server on 127.0.0.1 without a Supervisely instance: ``python -m sly_emulator``
serves, :class:`Emulator` does the same in-process, :mod:`sly_emulator.seed` puts a local
project on it. ``README.md`` next to this package says what is and is not emulated.
"""

from sly_emulator._api import INSTANCE_VERSION
from sly_emulator.server import METHODS, Emulator, Unsatisfiable, main, parse_range, start_process

__all__ = [
    "INSTANCE_VERSION",
    "METHODS",
    "Emulator",
    "Unsatisfiable",
    "main",
    "parse_range",
    "start_process",
]
