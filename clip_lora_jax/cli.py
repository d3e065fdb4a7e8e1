"""What the command lines (train.py, eval.py) share: flag parsing with one-line errors, a full
help that lists every config key, quiet libraries, and the process set-up done before JAX starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

import ml_collections
from absl import app, flags, logging

from clip_lora_jax import xla_flags
from clip_lora_jax.errors import UserError

_VERBOSITY_FLAGS = ("-v", "--v", "-verbosity", "--verbosity")


def verbosity_requested(argv: Sequence[str]) -> bool:
  """Whether the command line sets absl's --verbosity (-v): then libraries may speak."""
  return any(arg in _VERBOSITY_FLAGS or arg.startswith(tuple(f"{f}=" for f in _VERBOSITY_FLAGS))
             for arg in argv[1:])


def silence_library_noise(argv: Sequence[str]) -> None:
  """Unless --verbosity is given: TensorFlow's C++ logging below errors, transformers' warnings
  (such as "PyTorch was not found"), and Python warnings other than clip_lora_jax's own (which
  say something about the run, e.g. a class with fewer images than shots). Call it before
  TensorFlow or transformers is imported; `start` quiets absl logging below errors as well."""
  if verbosity_requested(argv):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  warnings.filterwarnings("ignore")
  warnings.filterwarnings("default", module=r"clip_lora_jax(\.|$)")


@contextlib.contextmanager
def quiet_imports(argv: Sequence[str]) -> Iterator[None]:
  """Unless --verbosity is given, sends what the block writes to the stderr file descriptor to
  /dev/null: TensorFlow prints its oneDNN notice from C++ at import, before its logging is set
  up, whatever TF_CPP_MIN_LOG_LEVEL says. A failing import raises after stderr is back."""
  if verbosity_requested(argv):
    yield
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `path.py[:arg]`, as `--config` loads it: `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("config_file", path)
  if not os.path.isfile(path) or module_spec is None:
    raise UserError(f"could not load the config file: {path!r} does not exist")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_keys(config: ml_collections.ConfigDict, prefix: str = "--config.") -> list[str]:
  """`--config.KEY=DEFAULT (type)` for every key of `config`, nested keys dotted."""
  lines = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      lines += config_keys(value, f"{prefix}{key}.")
    else:
      lines.append(f"{prefix}{key}={value} ({config.get_type(key).__name__})")
  return lines


def _config_argument(argv: Sequence[str]) -> str | None:
  """The value of --config on the command line, if given."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def print_full_help(argv: Sequence[str], default_config: str) -> None:
  """absl's --helpfull, then every key of the --config file given (else of `default_config`)
  with its default value and type."""
  spec = _config_argument(argv) or default_config
  keys = config_keys(load_config_file(spec))
  app.usage(writeto_stdout=True)
  print(f"config keys of {spec} (override any with --config.KEY=VALUE; --config FILE "
        "--helpfull lists another file's):")
  print("\n".join(f"  {line}" for line in keys))


def parse_flags_or_exit(argv: list[str], exit_code: int = 2,
                        default_config: str | None = None) -> list[str]:
  """absl flag parsing for `app.run(..., flags_parser=...)` with one-line errors; `--helpfull`
  also lists the config keys (of --config, else of `default_config`).

  A misspelt `--config.KEY=VALUE` override otherwise surfaces as an AttributeError traceback
  from ml_collections, a config file that does not compile as a SyntaxError traceback; here
  they become `error: ...` and a non-zero exit.
  """
  try:
    if "--helpfull" in argv[1:] and default_config is not None:
      print_full_help(argv, default_config)
      sys.exit(0)
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.keys()  # Config files load lazily: surface their errors now.
    return remaining
  except UserError as e:
    message = str(e)
  except SyntaxError as e:
    message = f"could not load the config file: {e.msg} ({e.filename}, line {e.lineno})"
  except (ImportError, NameError) as e:
    message = f"could not load the config file: {type(e).__name__}: {e}"
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


def start(argv: list[str], arguments: bool = False) -> flags.FlagValues:
  """Checks for stray arguments (unless the command takes `arguments`, as predict.py its images),
  applies the measured XLA flags and the persistent compilation cache, and quiets absl logging
  below errors (orbax and TFDS log every step at INFO and deprecations at WARNING; `-v 0` brings
  them back). Returns the parsed flags."""
  if len(argv) > 1 and not arguments:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  xla_flags.use_fast_cpu_flags()
  xla_flags.use_compilation_cache()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  return flags.FLAGS
