"""The few-shot methods, by the name `config.method` gives them: one module each, one registry.

A new method is one module of this package, one config file and one line of `METHODS`. Every
method module offers the same surface:

  SECTION                 the config section holding its settings (`config.<SECTION>`);
  train_and_evaluate(config, workdir, overwrite) -> results   what train.py runs;
  load_adapter(path) -> adapter                                reads its adapter file;
  logits_fn(base, adapter, class_names, templates) -> (images -> logits)   eval.py, predict.

Adapters have `method`, `config` (a frozen dataclass with `to_dict` / `from_dict`), the base
identity (`base_name`, `base_config`, `base_fingerprint`), `few_shot` and `template`.

Shared pieces: `clip_lora_jax.training` (run start, loop, optimizer, checkpoints, results),
`clip_lora_jax.features` (cached frozen embeddings), `feature_cache` (the whole run of a method
that trains on cached features), `prompt_learning` (the whole run of a method that learns prompt
tokens through the frozen towers). Imports go one way: data, model, features, training <- methods
<- train.py, eval.py. This module imports them on first use only: config files read the
registry without loading JAX or TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from clip_lora_jax.errors import UserError

if TYPE_CHECKING:
  import ml_collections

  from clip_lora_jax import base as base_lib


@dataclasses.dataclass(frozen=True)
class Method:
  """Where a method lives: its module under `clip_lora_jax.methods` and its recipe, the config
  file `configs/<config_file>.py`."""
  module: str
  config_file: str


METHODS: dict[str, Method] = {
    "lora": Method("lora", "fewshot"),
    "block_lora": Method("lora", "block_lora"),
    "llu": Method("llu", "llu"),
    "zero_shot": Method("zero_shot", "zero_shot"),
    "clip_adapter": Method("clip_adapter", "clip_adapter"),
    "taskres": Method("taskres", "taskres"),
    "prolip": Method("prolip", "prolip"),
    "linear_probe": Method("linear_probe", "linear_probe"),
    "lp_plus_plus": Method("lp_plus_plus", "lp_plus_plus"),
    "clap": Method("clap", "clap"),
    "tip_adapter": Method("tip_adapter", "tip_adapter"),
    "tip_adapter_f": Method("tip_adapter", "tip_adapter_f"),
    "gda": Method("gda", "gda"),
    "coop": Method("coop", "coop"),
    "kgcoop": Method("kgcoop", "kgcoop"),
    "prograd": Method("prograd", "prograd"),
    "cocoop": Method("cocoop", "cocoop"),
    "maple": Method("maple", "maple"),
}


def get(name: str) -> ModuleType:
  """The module of method `name`, imported on first use."""
  if name not in METHODS:
    raise UserError(f"config.method={name!r}: use one of {', '.join(METHODS)}")
  return importlib.import_module(f"{__name__}.{METHODS[name].module}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict[str, Any]:
  """Runs `config.method` (train.py's entry point) in `workdir`, resuming the run there.

  A workdir holding this run finished is not trained again: its results are returned (and, with
  `config.export_merged`, the merged model is added if missing). One holding another run is
  refused, unless `overwrite` replaces it.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import training, workdirs  # pylint: disable=import-outside-toplevel
  method = get(config.method)
  if config.get("export_merged") and not hasattr(method, "export_finished"):
    raise UserError(f"config.export_merged=True: a {config.method!r} adapter does not change "
                    "the weights, so there is no merged model to export; drop the override")
  training.resolve(config)
  if not overwrite:
    results = workdirs.finished_results(config, workdir)
    if results is not None:
      if jax.process_index() == 0:
        print(f"{workdir} holds this run, finished: nothing to train", flush=True)
        if config.export_merged:
          method.export_finished(config, workdir)
      return results
  return method.train_and_evaluate(config, workdir, overwrite)


def load_adapter(path: str) -> Any:
  """Any method's adapter file, read by the module of the method it records."""
  from clip_lora_jax import files  # pylint: disable=import-outside-toplevel
  _, metadata = files.read_safetensors(path, tensors=False)
  name = metadata.get("method", "")
  if not metadata.get("format", "").startswith("clip_lora_jax.") or name not in METHODS:
    raise UserError(f"{path!r} is not a clip_lora_jax adapter file (format "
                    f"{metadata.get('format')!r}, method {name or None!r}; known methods: "
                    f"{', '.join(METHODS)})")
  return get(name).load_adapter(path)


def logits_fn(base: base_lib.BaseModel, adapter: Any, class_names: Sequence[str],
              templates: Sequence[str]) -> Callable:
  """images -> class scores of `base` with `adapter` (any method's), classes `class_names`."""
  return get(adapter.method).logits_fn(base, adapter, class_names, templates)


def check_overrides(adapter: Any, config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> None:
  """Raises a UserError naming every command-line override (`--config.KEY=...`, the keys given)
  of an adapter-defining key that contradicts `adapter`: its method, or a setting of its own
  config section or of another method's section. The adapter's settings always apply; an
  override that does not change them is accepted."""
  section = get(adapter.method).SECTION
  others = {get(name).SECTION for name in METHODS} - {section}
  given = {key[len(section) + 1:] for key in overrides if key.startswith(f"{section}.")}
  requested = type(adapter.config).from_dict(
      {**adapter.config.to_dict(), **{key: config[section][key] for key in given}})
  problems = [f"{section}.{key}={getattr(requested, key)!r} (the adapter's is "
              f"{getattr(adapter.config, key)!r})"
              for key in sorted(given) if getattr(requested, key) != getattr(adapter.config, key)]
  if "method" in overrides and config.method != adapter.method:
    problems.append(f"method={config.method!r} (the adapter's is {adapter.method!r})")
  problems += [f"{key} (not a setting of a {adapter.method!r} adapter)"
               for key in sorted(overrides) if key.split(".")[0] in others]
  if problems:
    raise UserError(f"the command line contradicts the adapter: {'; '.join(problems)}. The "
                    "adapter's own settings apply: drop these overrides, or pass the adapter "
                    "that has them")

