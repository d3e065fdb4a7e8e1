"""What the command lines (train.py, eval.py) share: flag parsing with one-line errors, and the
process set-up done before JAX starts."""

from __future__ import annotations

import sys

from absl import app, flags, logging

from clip_lora_jax import xla_flags
from clip_lora_jax.errors import UserError


def parse_flags_or_exit(argv: list[str], exit_code: int = 2) -> list[str]:
  """absl flag parsing for `app.run(..., flags_parser=...)` with one-line errors.

  A misspelt `--config.KEY=VALUE` override otherwise surfaces as an AttributeError traceback
  from ml_collections; here it becomes `error: ...` and a non-zero exit.
  """
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


def start(argv: list[str]) -> flags.FlagValues:
  """Checks for stray arguments, applies the measured XLA flags and the persistent compilation
  cache, and quiets INFO logging (orbax and TFDS log every step at INFO; `-v 0` brings it
  back). Returns the parsed flags."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  xla_flags.use_fast_cpu_flags()
  xla_flags.use_compilation_cache()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  return flags.FLAGS
