"""The few-shot methods, by the name `config.method` gives them.

A new method is one module (its math and a `train_and_evaluate(config, workdir, overwrite)`),
one config file, and one line in each table below.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections

from clip_lora_jax import base as base_lib
from clip_lora_jax import block_lora, files, llu, lora, training, workdirs
from clip_lora_jax.errors import UserError

# Weight-space adapters (LoRA and its variants) share the train step of `training`.
TRAINERS: dict[str, Callable[[ml_collections.ConfigDict, str, bool], dict[str, Any]]] = {
    lora.LoRAConfig.method: training.train_and_evaluate,
    block_lora.BlockLoRAConfig.method: training.train_and_evaluate,
    "llu": llu.train_and_evaluate,
}
# Adapter file format -> its reader.
ADAPTER_READERS: dict[str, Callable[[str], Any]] = {
    lora.FORMAT: lora.load_adapter,
    llu.FORMAT: llu.load_adapter,
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict[str, Any]:
  """Runs `config.method` (train.py's entry point) in `workdir`, resuming the run there.

  A workdir holding this run finished is not trained again: its results are returned (and, with
  `config.export_merged`, the merged model is added if missing). One holding another run is
  refused, unless `overwrite` replaces it.
  """
  if config.method not in TRAINERS:
    raise UserError(f"config.method={config.method!r}: use one of {', '.join(TRAINERS)}")
  training.resolve(config)
  if not overwrite:
    results = workdirs.finished_results(config, workdir)
    if results is not None:
      if jax.process_index() == 0:
        print(f"{workdir} holds this run, finished: nothing to train", flush=True)
        if config.export_merged:
          export_finished(config, workdir)
      return results
  return TRAINERS[config.method](config, workdir, overwrite)


def export_finished(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Adds the merged model to the workdir of a finished weight-space run, from its adapter file
  (no retraining); nothing if it is there."""
  if os.path.isdir(os.path.join(workdir, workdirs.MERGED_DIR)):
    return
  adapter = load_adapter(os.path.join(workdir, workdirs.ADAPTER_FILE))
  if not isinstance(adapter, lora.Adapter):
    raise UserError(llu.NO_MERGED_EXPORT)
  base = base_lib.load_base_model(config.model, config.random_init, config.seed)
  lora.check_compatible(adapter, base.name, base.config, base.fingerprint)
  training.export_merged(workdir, base, adapter)


def load_adapter(path: str) -> lora.Adapter | llu.Adapter:
  """Any method's adapter file, read by the reader of its format."""
  _, metadata = files.read_safetensors(path, tensors=False)
  reader = ADAPTER_READERS.get(metadata.get("format", ""))
  if reader is None:
    raise UserError(f"{path!r} is not a clip_lora_jax adapter file (format "
                    f"{metadata.get('format')!r}; known: {', '.join(ADAPTER_READERS)})")
  return reader(path)


def check_overrides(adapter: lora.Adapter | llu.Adapter, config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> None:
  """Raises a UserError naming every command-line override (`--config.KEY=...`, the keys given)
  of an adapter-defining key that contradicts `adapter`: its method, or a setting of its own
  section (`lora.*`, `llu.*`) or of another method's section. The adapter's settings always
  apply; an override that does not change them is accepted."""
  section, other = ("llu", "lora") if isinstance(adapter, llu.Adapter) else ("lora", "llu")
  method = "llu" if isinstance(adapter, llu.Adapter) else adapter.config.method
  given = {key[len(section) + 1:] for key in overrides if key.startswith(f"{section}.")}
  requested = type(adapter.config).from_dict(
      {**adapter.config.to_dict(), **{key: config[section][key] for key in given}})
  problems = [f"{section}.{key}={getattr(requested, key)!r} (the adapter's is "
              f"{getattr(adapter.config, key)!r})"
              for key in sorted(given) if getattr(requested, key) != getattr(adapter.config, key)]
  if "method" in overrides and config.method != method:
    problems.append(f"method={config.method!r} (the adapter's is {method!r})")
  problems += [f"{key} (not a setting of a {method!r} adapter)"
               for key in sorted(overrides) if key.startswith(f"{other}.")]
  if problems:
    raise UserError(f"the command line contradicts the adapter: {'; '.join(problems)}. The "
                    "adapter's own settings apply: drop these overrides, or pass the adapter "
                    "that has them")
