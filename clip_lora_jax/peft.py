"""PEFT interop: our LoRA adapters as PEFT LoRA directories for transformers' `CLIPModel`, and
PEFT LoRA directories as our adapters.

  python -m clip_lora_jax.peft export ADAPTER.safetensors OUT_DIR
  python -m clip_lora_jax.peft import PEFT_DIR OUT.safetensors [--model BASE]

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors`; for every
adapted `torch.nn.Linear` (weight W of shape (out, in)) the weights hold
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), and PEFT adds
`scaling * B @ A` to W, with scaling = lora_alpha / sqrt(r) under `use_rslora`, else
lora_alpha / r. Our pair at the same projection is a = A^T (in, r), b = B^T (r, out), adding
`scale * a @ b` to the kernel W^T (`lora.merge`): the same update when the scalings agree, and
they are computed alike: our scaling 'sqrt' is `use_rslora=True`, 'linear' plain PEFT.

Export writes the adapted projections as an explicit list of `target_modules` (only our towers
and layers are adapted); `PeftModel.from_pretrained(CLIPModel.from_pretrained(base), OUT_DIR)`
then computes what the merged adapter computes. A Block-LoRA adapter exports as the plain LoRA
of its `pairs()` (its input split's shared A_s tiled over the input chunks, its rank split's B_i
summed at rank r/n) and says so; an LLU adapter, which updates embeddings rather than weights,
does not export.

Import reads a directory that PEFT wrote for a `CLIPModel` and refuses, by name, what our
`lora.LoRAConfig` cannot represent: trained biases, DoRA, modules_to_save, other modules than the
encoders' q/k/v/out_proj, per-module ranks or alphas, different layer or matrix sets per tower,
initialisations that change the base weights, forward variants. It needs the base model the
adapter was trained on (for its architecture and fingerprint, as every adapter file records).

Neither direction imports torch or peft: the files are JSON and safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from clip_lora_jax import base as base_lib
from clip_lora_jax import checkpoints, files, lora
from clip_lora_jax.errors import UserError, exit_on_user_error
from clip_lora_jax.model import CLIPConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
README_FILE = "README.md"
# What PEFT prefixes to the module names of a `CLIPModel` it wraps (task_type None).
PREFIX = "base_model.model."
FACTORS = {"A": ".lora_A.weight", "B": ".lora_B.weight"}
# The defaults of peft.LoraConfig (0.21) for the keys read here, should a file omit one.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False,
                 "bias": "none", "init_lora_weights": True, "peft_type": "LORA"}
# adapter_config.json keys that do not change what a saved adapter computes, or that are read
# below (every other key must be unset: None, False or empty).
_NEUTRAL_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "fan_in_fan_out", "init_lora_weights", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config",
    "ensure_weight_tying"})
# Initialisations that leave the base weights as they are (the others, PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA, subtract the initial update from the base or quantise it; MiCA changes the
# forward).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Why some options cannot be imported, beyond "not supported".
_REASONS = {
    "use_dora": "DoRA rescales every adapted weight by a learned magnitude vector",
    "modules_to_save": "it trains full copies of these modules, which an adapter file cannot hold",
    "lora_bias": "it gives lora_B a trained bias",
    "layer_replication": "it duplicates layers of the base model",
    "trainable_token_indices": "it trains token embeddings",
    "target_parameters": "it adapts parameters, not Linear modules",
}


def attention_modules(model_config: CLIPConfig) -> dict[tuple[str, int, str], str]:
  """(tower, layer, matrix) -> the `CLIPModel` module name of every attention projection, e.g.
  ('text', 1, 'q') -> 'text_model.encoder.layers.1.self_attn.q_proj'."""
  return {(path[0], int(path[1].removeprefix("layers_")), path[3]): name
          for path, name in checkpoints.hf_linear_modules(model_config).items()
          if len(path) == 4 and path[2] == "attn"}


# ------------------------------------------------------------------------------------------------
# Export.


def to_peft(adapter: lora.Adapter) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config.json dict, adapter_model.safetensors tensors) of a LoRA-family adapter.

  The rank is that of the adapter's `pairs()` (a Block-LoRA rank split's is rank / blocks) and
  lora_alpha gives PEFT's scaling the adapter's scale: the adapter's own alpha when the ranks
  agree (the scalings are then computed alike, bit for bit), else scale x sqrt(r) or scale x r
  (equal to the scale up to float rounding).
  """
  config, model_config = adapter.config, adapter.base_config
  modules, pairs = attention_modules(model_config), config.pairs(adapter.lora)
  tensors, ranks = {}, set()
  for tower, layer, matrix in lora.targets(model_config, config):
    pair = pairs[tower][f"layers_{layer}"]["attn"][matrix]
    a, b = np.asarray(pair["a"], np.float32), np.asarray(pair["b"], np.float32)
    # An `a` with fewer rows than the input is shared by its equal chunks (`model.Dense`).
    a = np.tile(a, (model_config.tower(tower).width // a.shape[0], 1))
    name = PREFIX + modules[(tower, layer, matrix)]
    tensors[name + FACTORS["A"]] = np.ascontiguousarray(a.T)
    tensors[name + FACTORS["B"]] = np.ascontiguousarray(b.T)
    ranks.add(b.shape[0])
  (rank,) = ranks
  rslora = config.scaling == "sqrt"
  alpha = config.alpha if rank == config.rank else \
      config.scale * (math.sqrt(rank) if rslora else rank)
  peft_config = {
      "peft_type": "LORA", "task_type": None,
      "auto_mapping": {"base_model_class": "CLIPModel",
                       "parent_library": "transformers.models.clip.modeling_clip"},
      "base_model_name_or_path": checkpoints.HUB_IDS.get(adapter.base_name, adapter.base_name),
      "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": config.dropout,
      "target_modules": sorted(modules[t] for t in lora.targets(model_config, config)),
      "bias": "none", "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
      "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
  }
  return peft_config, tensors


def export_notes(adapter: lora.Adapter, peft_config: dict[str, Any]) -> list[str]:
  """What the export changed or left behind, for the user and the directory's README."""
  config = adapter.config
  notes = []
  if config.method != lora.LoRAConfig.method:
    notes.append(f"a {config.method} adapter ({config}) exported as the equivalent plain LoRA of "
                 f"its pairs(): rank {peft_config['r']}, lora_alpha {peft_config['lora_alpha']!r}, "
                 f"scaling {config.scale!r} as its own")
  if adapter.template is not None:
    notes.append(f"trained with the prompt template {adapter.template!r} (not in PEFT's files)")
  if adapter.few_shot is not None:
    notes.append(f"trained on {json.dumps(adapter.few_shot, sort_keys=True)}")
  return notes


def _readme(source: str, adapter: lora.Adapter, peft_config: dict[str, Any],
            notes: list[str]) -> str:
  """The exported directory's README.md: where it comes from and how to load it."""
  lines = [
      "# PEFT LoRA adapter for transformers' CLIPModel", "",
      f"Exported by clip_lora_jax (`python -m clip_lora_jax.peft export`) from `{source}`, a "
      f"{adapter.config.method} adapter for base `{adapter.base_name}` (architecture "
      f"{adapter.base_config.name or 'custom'}, weights fingerprint {adapter.base_fingerprint}).",
      "", "```python",
      "from peft import PeftModel",
      "from transformers import CLIPModel",
      f"model = PeftModel.from_pretrained(CLIPModel.from_pretrained("
      f"{peft_config['base_model_name_or_path']!r}), 'THIS_DIR')", "```", ""]
  return "\n".join(lines + [f"- {note}" for note in notes]) + "\n"


def export_adapter(path: str, directory: str) -> tuple[dict[str, Any], list[str]]:
  """Writes the LoRA or Block-LoRA adapter file `path` as the PEFT LoRA directory `directory`
  (absent or empty; written whole or not at all); returns its adapter config and
  `export_notes`."""
  files.check_new_directory(directory, "export")
  _, metadata = files.read_safetensors(path, tensors=False)
  if metadata.get("method") and metadata.get("format") != lora.FORMAT:
    raise UserError(f"{path!r} holds a {metadata['method']} adapter ({metadata.get('format')}), "
                    "which does not update CLIP's attention weights by low-rank products: PEFT's "
                    "LoRA cannot represent it (LoRA and Block-LoRA adapters export)")
  adapter = lora.load_adapter(path)
  peft_config, tensors = to_peft(adapter)
  notes = export_notes(adapter, peft_config)
  with files.atomic_directory(directory, "export") as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(peft_config, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, WEIGHTS_FILE), "wb") as f:
      f.write(files.safetensors_bytes(tensors, {"format": "pt"}))
    with open(os.path.join(tmp, README_FILE), "w", encoding="utf-8") as f:
      f.write(_readme(path, adapter, peft_config, notes))
  return peft_config, notes


# ------------------------------------------------------------------------------------------------
# Import.


def read_peft(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config.json dict, tensors of adapter_model.safetensors) of a PEFT directory."""
  config_path, weights_path = (os.path.join(directory, f) for f in (CONFIG_FILE, WEIGHTS_FILE))
  if not os.path.isdir(directory):
    raise UserError(f"PEFT adapter directory {directory!r} does not exist")
  if not os.path.isfile(config_path):
    raise UserError(f"{directory!r} has no {CONFIG_FILE}: not a PEFT adapter directory")
  try:
    with open(config_path, encoding="utf-8") as f:
      peft_config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{config_path!r} is not readable JSON: {e}") from e
  if not isinstance(peft_config, dict):
    raise UserError(f"{config_path!r} does not hold a JSON object")
  if not os.path.isfile(weights_path):
    raise UserError(f"{directory!r} has no {WEIGHTS_FILE} (only safetensors weights are read); "
                    "save the adapter with PEFT's save_pretrained(dir), whose default it is")
  tensors, _ = files.read_safetensors(weights_path, what="PEFT adapter")
  return peft_config, tensors


def _option(peft_config: dict[str, Any], key: str) -> Any:
  """An adapter_config.json option, PEFT's default where the file omits it."""
  return peft_config.get(key, PEFT_DEFAULTS.get(key))


def check_peft_config(peft_config: dict[str, Any], where: str) -> None:
  """Raises a UserError naming the first option of a PEFT config that our LoRA cannot represent."""
  get = lambda key: _option(peft_config, key)
  if get("peft_type") != "LORA":
    raise UserError(f"{where}: peft_type {get('peft_type')!r} is not LoRA; clip_lora_jax imports "
                    "PEFT LoRA adapters only")
  if get("bias") != "none":
    raise UserError(f"{where}: bias={get('bias')!r} trains biases, which clip_lora_jax's LoRA "
                    "does not adapt; train with bias='none'")
  init = get("init_lora_weights")
  if init not in _PLAIN_INITS:
    raise UserError(f"{where}: init_lora_weights={init!r} changes the base weights or the "
                    "forward, not only the low-rank factors; clip_lora_jax imports adapters of "
                    f"the unchanged base ({', '.join(map(repr, _PLAIN_INITS))})")
  for key, value in sorted(peft_config.items()):
    if key not in _NEUTRAL_KEYS and value:
      reason = _REASONS.get(key, "clip_lora_jax imports plain LoRA only")
      raise UserError(f"{where}: {key}={value!r} cannot be represented: {reason}")
  alphas = {float(a) for a in (get("alpha_pattern") or {}).values()}
  if alphas - {float(get("lora_alpha"))}:
    raise UserError(f"{where}: alpha_pattern={get('alpha_pattern')!r} gives modules their own "
                    "alpha; clip_lora_jax's LoRA has one alpha for every module")


def _factors(tensors: dict[str, np.ndarray], model_config: CLIPConfig, where: str
             ) -> dict[tuple[str, int, str], dict[str, np.ndarray]]:
  """(tower, layer, matrix) -> {'A': (r, in), 'B': (out, r)} of the PEFT weights; a UserError
  naming the tensors that are no LoRA factors of an encoder attention projection of the base."""
  names = attention_modules(model_config)
  modules = {name: target for target, name in names.items()}
  factors: dict[tuple[str, int, str], dict[str, np.ndarray]] = {}
  foreign = []
  for key in sorted(tensors):
    kind = next((k for k, suffix in FACTORS.items() if key.endswith(suffix)), None)
    module = key.removeprefix(PREFIX).removesuffix(FACTORS[kind]) if kind else None
    if not key.startswith(PREFIX) or module not in modules:
      foreign.append(key)
      continue
    factors.setdefault(modules[module], {})[kind] = tensors[key]
  if foreign:
    shown = ", ".join(foreign[:4]) + (f" ... ({len(foreign)} in all)" if len(foreign) > 4 else "")
    raise UserError(
        f"{where} holds tensors that clip_lora_jax's LoRA cannot represent: {shown}. It adapts "
        f"q_proj, k_proj, v_proj and out_proj of the encoder layers only (the base has "
        f"{model_config.vision.layers} vision and {model_config.text.layers} text layers), "
        "through lora_A and lora_B alone")
  if not factors:
    raise UserError(f"{where} holds no LoRA weights")
  for target, pair in factors.items():
    name = PREFIX + names[target]
    if set(pair) != set(FACTORS):
      raise UserError(f"{where}: {name} has {sorted(pair)} but not both lora_A and lora_B")
    width = model_config.tower(target[0]).width
    a, b = pair["A"], pair["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != width or b.shape[0] != width or \
        a.shape[0] != b.shape[1]:
      raise UserError(f"{where}: {name} has lora_A {a.shape} and lora_B {b.shape} where "
                      f"(r, {width}) and ({width}, r) fit the base (was it trained on another "
                      "architecture?)")
  return factors


def _layer_spec(layers: dict[str, tuple[int, ...]], model_config: CLIPConfig, where: str
                ) -> str | tuple[int, ...]:
  """Our `layers` for the adapted layer indices of each tower: 'all' if that is what they are,
  else the explicit indices if both towers share them, else a named set that gives each tower
  its own (e.g. 'half-up' of 24 vision and 12 text layers)."""
  def fits(spec):
    try:
      return all(lora.layer_indices(spec, model_config.tower(t).layers) == indices
                 for t, indices in layers.items())
    except UserError:  # a named set that is not defined for this depth
      return False
  if fits("all"):
    return "all"
  if len(set(layers.values())) == 1:
    return next(iter(layers.values()))
  named = next((name for name in lora.LAYER_SETS_12 if fits(name)), None)
  if named is None:
    described = "; ".join(f"{t}: {list(i)}" for t, i in layers.items())
    raise UserError(f"{where} adapts different layers in each tower ({described}), which no "
                    "clip_lora_jax layer set expresses (one list, or one named set, serves both "
                    "towers)")
  return named


def from_peft(peft_config: dict[str, Any], tensors: dict[str, np.ndarray], base_name: str,
              base_config: CLIPConfig, base_fingerprint: str, where: str) -> lora.Adapter:
  """Our adapter for the PEFT LoRA config and weights of a `CLIPModel` whose weights are the
  base identified by (`base_name`, `base_config`, `base_fingerprint`); a UserError naming what
  cannot be represented (see the module docstring)."""
  check_peft_config(peft_config, where)
  factors = _factors(tensors, base_config, where)
  names = attention_modules(base_config)
  ranks = {}  # each rank -> the first module that has it
  for target, pair in factors.items():
    ranks.setdefault(int(pair["A"].shape[0]), PREFIX + names[target])
  if len(ranks) > 1:
    shown = ", ".join(f"{name}: {r}" for r, name in ranks.items())
    raise UserError(f"{where} has modules of different ranks (rank_pattern; {shown}); "
                    "clip_lora_jax's LoRA has one rank for every module")
  matrices: dict[str, dict[int, tuple[str, ...]]] = {}  # tower -> layer -> matrices
  for tower, layer, matrix in sorted(factors, key=lambda t: (lora.TOWERS.index(t[0]), t[1],
                                                             lora.MATRICES.index(t[2]))):
    layer_matrices = matrices.setdefault(tower, {})
    layer_matrices[layer] = layer_matrices.get(layer, ()) + (matrix,)
  first_use = {}  # each distinct set of matrices -> the first layer adapting it
  for tower, layer_matrices in matrices.items():
    for layer, used in layer_matrices.items():
      first_use.setdefault(used, f"{tower} layer {layer}")
  if len(first_use) > 1:
    described = "; ".join(f"{where_used}: {', '.join(used)}" for used, where_used in
                          first_use.items())
    raise UserError(f"{where} adapts different projections in different layers ({described}); "
                    "clip_lora_jax's LoRA adapts the same matrices in every adapted layer")
  towers = tuple(matrices)
  layers = {t: tuple(matrices[t]) for t in towers}
  config = lora.LoRAConfig(
      encoders="both" if len(towers) == 2 else towers[0], matrices=next(iter(first_use)),
      layers=_layer_spec(layers, base_config, where), rank=next(iter(ranks)),
      alpha=float(_option(peft_config, "lora_alpha")),
      scaling="sqrt" if _option(peft_config, "use_rslora") else "linear",
      dropout=float(_option(peft_config, "lora_dropout")))
  tree: dict = {}
  for (tower, layer, matrix), pair in factors.items():
    tree.setdefault(tower, {}).setdefault(f"layers_{layer}", {}).setdefault("attn", {})[matrix] = {
        "a": jnp.asarray(pair["A"].T, jnp.float32), "b": jnp.asarray(pair["B"].T, jnp.float32)}
  lora.check_matches(tree, lora.abstract_init(base_config, config), what=where)
  return lora.Adapter(tree, config, base_name, base_config, base_fingerprint)


def import_adapter(directory: str, model: str | None = None) -> lora.Adapter:
  """Our adapter for the PEFT LoRA directory `directory`, trained on the base `model` (as
  train.py's config.model names it; default: the directory's base_model_name_or_path), whose
  weights are loaded for the adapter's record of its base."""
  peft_config, tensors = read_peft(directory)
  where = f"PEFT adapter {directory!r}"
  check_peft_config(peft_config, where)  # before the base model is loaded
  model = model or peft_config.get("base_model_name_or_path")
  if not model:
    raise UserError(f"{where} does not name its base model (base_model_name_or_path); pass "
                    "--model with the base it was trained on")
  base = base_lib.load_base_model(model)
  return from_peft(peft_config, tensors, base.name, base.config, base.fingerprint, where)


# ------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m clip_lora_jax.peft", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  export_parser = commands.add_parser(
      "export", help="write an adapter file as a PEFT LoRA directory",
      description="Write a LoRA or Block-LoRA adapter file (train.py's adapter.safetensors) as a "
                  f"PEFT LoRA directory ({CONFIG_FILE}, {WEIGHTS_FILE}, {README_FILE}) for "
                  "transformers' CLIPModel.")
  export_parser.add_argument("adapter", metavar="ADAPTER.safetensors")
  export_parser.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty directory")
  import_parser = commands.add_parser(
      "import", help="write a PEFT LoRA directory as an adapter file",
      description="Write a PEFT LoRA directory trained on a transformers CLIPModel as a "
                  "clip_lora_jax adapter file, which eval.py and lora.load_adapter read.")
  import_parser.add_argument("peft_dir", metavar="PEFT_DIR")
  import_parser.add_argument("out", metavar="OUT.safetensors", help="a new adapter file")
  import_parser.add_argument(
      "--model", metavar="BASE",
      help="the base model the adapter was trained on, as train.py's config.model takes it (hub "
           "id, Hugging Face directory, OpenCLIP file or architecture name such as ViT-B/16); "
           "default: the directory's base_model_name_or_path")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with exit_on_user_error():
    if args.command == "export":
      peft_config, notes = export_adapter(args.adapter, args.out_dir)
      print(f"wrote {args.out_dir}: PEFT LoRA of {len(peft_config['target_modules'])} modules, "
            f"r={peft_config['r']}, lora_alpha={peft_config['lora_alpha']!r}, "
            f"use_rslora={peft_config['use_rslora']}, base "
            f"{peft_config['base_model_name_or_path']}")
      for note in notes:
        print(f"note: {note}")
    else:
      files.check_writable(args.out, "OUT.safetensors")
      if os.path.exists(args.out):
        raise UserError(f"{args.out!r} already exists; choose a new path or remove it first")
      adapter = import_adapter(args.peft_dir, args.model)
      lora.save_adapter(args.out, adapter)
      print(f"wrote {args.out}: {adapter.config} for base {adapter.base_name} "
            f"(fingerprint {adapter.base_fingerprint})")


if __name__ == "__main__":
  main(sys.argv[1:])
