"""User-facing errors.

Anything the user can fix (a bad path, an unknown name, a shape that does not fit) is raised as
a `UserError`. The command-line entry points catch it and print one clear message with a
non-zero exit, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
  """An error caused by user input: the message says what is wrong, where, and how to fix it."""


@contextlib.contextmanager
def exit_on_user_error(exit_code: int = 2) -> Iterator[None]:
  """Turns a `UserError` into `error: <message>` on stderr and `sys.exit(exit_code)`."""
  try:
    yield
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(exit_code)

