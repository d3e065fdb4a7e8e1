"""A workdir belongs to one run.

`config.json` records the resolved config of the run a workdir holds; before anything is written,
a re-run compares its own resolved config with it and refuses a workdir holding another run,
naming each key whose value differs (checkpoints, metrics and results of two runs never mix).
Keys that do not change what a run computes (`FREE_KEYS`) may differ. A finished run (its
`results.json` is written last) re-run is a no-op; `overwrite` replaces the run a workdir holds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from clip_lora_jax import files
from clip_lora_jax.errors import UserError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
ADAPTER_FILE = "adapter.safetensors"
MERGED_DIR = "merged"
# Everything a run writes into its workdir (what `overwrite` removes).
RUN_FILES = (CONFIG_FILE, "checkpoints", "metrics.jsonl", "tensorboard", ADAPTER_FILE, MERGED_DIR,
             RESULTS_FILE)
# Config keys that change neither the trained adapter nor the test results: how progress is
# shown and logged, how often checkpoints are saved and kept, where data and caches are read, and
# whether a merged export is added.
FREE_KEYS = frozenset({"progress", "log_every", "eval_every", "checkpoint_every",
                       "keep_checkpoints", "export_merged", "data_dir", "cache_dir"})
_SHOWN_DIFFERENCES = 8
_ABSENT = object()


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as `config.json` records it (plain JSON values)."""
  return json.loads(config.to_json())


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def differences(recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
  """`key: <recorded> there, <requested> here` for every run-defining key (dotted) whose values
  differ, or that only one of the two configs has."""
  old, new = _flatten(recorded), _flatten(requested)
  show = lambda flat, key: json.dumps(flat[key]) if key in flat else "absent"
  return [f"{key} {show(old, key)} there, {show(new, key)} here"
          for key in sorted(set(old) | set(new))
          if key.split(".")[0] not in FREE_KEYS and old.get(key, _ABSENT) != new.get(key, _ABSENT)]


def check(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> None:
  """Raises a UserError when `workdir` cannot hold the run of `config`: it is a file or lies
  below one; or (unless `overwrite`) it holds another run, or run files without a config."""
  files.check_writable(workdir, "--workdir", directory=True)
  if overwrite:
    return
  fresh = "use another --workdir, or --overwrite to replace that run"
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
    if found:
      raise UserError(f"--workdir {workdir!r} holds {', '.join(found)} but no {CONFIG_FILE}, so "
                      f"the run they belong to is unknown; {fresh}")
    return
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path!r} cannot be read ({e}); {fresh}") from e
  diff = differences(recorded, resolved(config))
  if diff:
    more = len(diff) - _SHOWN_DIFFERENCES
    listed = "; ".join(diff[:_SHOWN_DIFFERENCES]) + (f"; and {more} more" if more > 0 else "")
    raise UserError(f"--workdir {workdir!r} holds another run ({listed}); {fresh}")


def finished_results(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The results of the run of `config` if `workdir` holds it finished, else None (after `check`,
  so a workdir holding another run is refused)."""
  check(config, workdir)
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def record(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> None:
  """Creates `workdir` and records the config of its run (process 0 writes; with `overwrite`,
  it first removes the run files there). Call it after every check: this is the first write."""
  if jax.process_index() == 0:
    if overwrite:
      for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, CONFIG_FILE), resolved(config))
  if jax.process_count() > 1:  # No process reads the workdir before it is ready.
    multihost_utils.sync_global_devices("clip_lora_jax.workdir.record")
  os.makedirs(workdir, exist_ok=True)
