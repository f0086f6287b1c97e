"""What the offline commands (``blobfs check``, ``blobfs pack``) do, apart from the CLI.

``cli.py`` parses arguments and prints; the work it asks for lives here, on top of the
library (sources, cache, format), which never imports a command.
"""
