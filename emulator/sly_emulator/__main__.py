"""``python -m sly_emulator --state DIR --token-file FILE``: serve until SIGTERM or Ctrl-C."""

from sly_emulator.server import main

main()
