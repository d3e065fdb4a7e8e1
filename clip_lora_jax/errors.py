"""User-facing errors.

Anything the user can fix (a bad path, an unknown name, a shape that does not fit) is raised as
a `UserError`. The command-line entry points catch it and print one clear message with a
non-zero exit, instead of a traceback; Ctrl-C is reported the same way.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C.


class UserError(Exception):
  """An error caused by user input: the message says what is wrong, where, and how to fix it."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during a run (still a KeyboardInterrupt): the message says where it stopped and how
  to go on."""


@contextlib.contextmanager
def exit_on_user_error(exit_code: int = 2) -> Iterator[None]:
  """Turns a `UserError` into `error: <message>` on stderr and `sys.exit(exit_code)`, and Ctrl-C
  (a KeyboardInterrupt, or an `Interrupted` saying where) into one line and exit code 130."""
  try:
    yield
  except KeyboardInterrupt as e:
    print(f"error: {e or 'interrupted'}", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(exit_code)
