"""Suite-wide test set-up.

``hypothesis`` is imported here, before any test imports the Supervisely SDK: after the
SDK's import (through one of its dependencies) CPython 3.11.7 fails to compile modules that
pytest rewrites later (``AST constructor recursion depth mismatch``), and the hypothesis
plugin imports its package lazily at the end of the session.
"""

import hypothesis  # noqa: F401
