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


def parse_flags_or_exit(argv: list[str], exit_code: int = 2) -> list[str]:
  """absl flag parsing for `app.run(..., flags_parser=...)` with one-line errors.

  A misspelt `--config.KEY=VALUE` override otherwise surfaces as an AttributeError traceback
  from ml_collections; here it becomes `error: ...` and a non-zero exit.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.keys()  # Config files load lazily: surface their errors now.
    return remaining
  except UserError as e:
    message = str(e)
  except OSError as e:  # ml_collections reports a missing or failing config file so.
    message = str(e).split("Failed loading config file")[-1].strip()
    message = f"could not load the config file: {message}"
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = "a --config override does not fit the config: " + \
        str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  print(f"error: {message}\n(see --helpfull for every flag and config key)", file=sys.stderr)
  sys.exit(exit_code)
