"""LoRA for CLIP as a separate pytree: config, pure init, pure merge / unmerge, adapter files.

The adapter pytree mirrors the paths of the base parameters it modifies:

    {'vision': {'layers_3': {'attn': {'q': {'a': (in, r), 'b': (r, out)}, ...}}}, 'text': ...}

so the model reads it as the `'lora'` variable collection (see `clip_lora_jax.model.Dense`) and
`merge` folds `scale * a @ b` into the kernel at the same path. Defaults are those of the
CLIP-LoRA reference code (Zanella & Ben Ayed, 2024): q, k, v of both towers in every layer,
rank 2, alpha 1, scale alpha / sqrt(rank), dropout 0.25 on the input of the low-rank branch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_lora_jax import files
from clip_lora_jax.errors import UserError
from clip_lora_jax.model import CLIPConfig, Params, config_from_dict

TOWERS = ("vision", "text")
ENCODERS = {"vision": ("vision",), "text": ("text",), "both": ("vision", "text")}
MATRICES = ("q", "k", "v", "o")
SCALINGS = ("sqrt", "linear")
# Named layer sets of the reference code, for 12-layer towers.
LAYER_SETS_12 = {
    "all": tuple(range(12)), "bottom": (0, 1, 2, 3), "mid": (4, 5, 6, 7), "up": (8, 9, 10, 11),
    "half-bottom": tuple(range(6)), "half-up": tuple(range(6, 12)), "top": (11,),
    "top3": (9, 10, 11),
}
FORMAT = "clip_lora_jax.lora/1"  # Adapter files of LoRA and its variants.
# Method name -> its adapter config class; subclasses of LoRAConfig register themselves here.
ADAPTER_TYPES: dict[str, type["LoRAConfig"]] = {}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Where the low-rank updates go and how they are scaled.

  encoders: 'vision', 'text' or 'both'. matrices: a subset of q, k, v, o. layers: 'all', a
  named set of the reference (bottom, mid, up, half-bottom, half-up, top, top3) or explicit
  layer indices. scaling: 'sqrt' gives alpha / sqrt(rank) (the reference), 'linear' alpha / rank.

  A variant of LoRA (e.g. `clip_lora_jax.methods.block_lora`) subclasses this config with its own
  `method` name, factor shapes and `pairs`; training, merging and adapter files then serve it.
  """
  method: ClassVar[str] = "lora"

  encoders: str = "both"
  matrices: tuple[str, ...] = ("q", "k", "v")
  layers: str | tuple[int, ...] = "all"
  rank: int = 2
  alpha: float = 1.0
  scaling: str = "sqrt"
  dropout: float = 0.25

  def __post_init__(self):
    if self.encoders not in ENCODERS:
      raise UserError(f"lora.encoders={self.encoders!r}: use one of {', '.join(ENCODERS)}")
    bad = [m for m in self.matrices if m not in MATRICES]
    if bad or not self.matrices:
      raise UserError(f"lora.matrices={self.matrices!r}: use a non-empty subset of "
                      f"{', '.join(MATRICES)}")
    if self.rank <= 0:
      raise UserError(f"lora.rank={self.rank}: the rank must be a positive integer")
    if not math.isfinite(self.alpha):
      raise UserError(f"lora.alpha={self.alpha}: must be a finite number")
    if self.scaling not in SCALINGS:
      raise UserError(f"lora.scaling={self.scaling!r}: use 'sqrt' (alpha/sqrt(r)) or 'linear' "
                      "(alpha/r)")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"lora.dropout={self.dropout}: must be in [0, 1)")
    if isinstance(self.layers, str) and self.layers not in LAYER_SETS_12:
      raise UserError(f"lora.layers={self.layers!r}: use one of {', '.join(LAYER_SETS_12)} or a "
                      "list of layer indices")

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    ADAPTER_TYPES[cls.method] = cls

  @property
  def scale(self) -> float:
    """The factor multiplying (x @ a) @ b."""
    return self.alpha / (math.sqrt(self.rank) if self.scaling == "sqrt" else self.rank)

  def factor_shapes(self, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the trainable (a, b) of one adapted width x width projection."""
    return (width, self.rank), (self.rank, width)

  def pairs(self, adapter: Params) -> Params:
    """The (a, b) pairs the model reads (`model.Dense`) from the trainable adapter pytree.

    For LoRA they are the adapter itself; variants map their factors to equivalent pairs here,
    inside the differentiated function, so gradients reach their own parameters.
    """
    return adapter

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
    """From a plain dict (a config section or an adapter file's metadata); lists become tuples."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise UserError(f"unknown {cls.method} option(s) {sorted(unknown)}; known: "
                      f"{[f.name for f in dataclasses.fields(cls)]}")
    for key in ("matrices", "layers"):
      if isinstance(d.get(key), (list, tuple)):
        d[key] = tuple(d[key])
    if isinstance(d.get("matrices"), str):
      d["matrices"] = tuple(m.strip() for m in d["matrices"].split(",") if m.strip())
    if isinstance(d.get("layers"), str) and d["layers"] not in LAYER_SETS_12:
      d["layers"] = _layer_list(d["layers"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


ADAPTER_TYPES[LoRAConfig.method] = LoRAConfig


def _layer_list(text: str) -> tuple[int, ...]:
  """Explicit layer indices as the command line gives them: "0,1" -> (0, 1)."""
  try:
    return tuple(int(i) for i in text.split(","))
  except ValueError:
    raise UserError(f"lora.layers={text!r}: use one of {', '.join(LAYER_SETS_12)} or layer "
                    "indices such as 0,1,2") from None


def layer_indices(layers: str | Sequence[int], depth: int) -> tuple[int, ...]:
  """The layer indices a layer spec selects in a tower of `depth` blocks.

  The reference defines every named set for 12-layer towers; for other depths (ViT-L/14's 24
  vision layers) it defines 'all', 'half-bottom' and 'half-up' only, and so do we.
  """
  if not isinstance(layers, str):
    indices = tuple(int(i) for i in layers)
    bad = [i for i in indices if not 0 <= i < depth]
    if bad or not indices:
      raise UserError(f"lora.layers={tuple(layers)}: indices must be in [0, {depth - 1}] for a "
                      f"{depth}-layer tower")
    return tuple(sorted(set(indices)))
  if depth == 12:
    return LAYER_SETS_12[layers]
  general = {"all": tuple(range(depth)), "half-bottom": tuple(range(depth // 2)),
             "half-up": tuple(range(depth // 2, depth))}
  if layers not in general:
    raise UserError(f"lora.layers={layers!r} is defined for 12-layer towers only; for a "
                    f"{depth}-layer tower use {', '.join(general)} or explicit indices")
  return general[layers]


def targets(model_config: CLIPConfig, lora_config: LoRAConfig) -> list[tuple[str, int, str]]:
  """(tower, layer, matrix) of every adapted projection, in a fixed order."""
  return [(tower, layer, matrix)
          for tower in ENCODERS[lora_config.encoders]
          for layer in layer_indices(lora_config.layers, model_config.tower(tower).layers)
          for matrix in lora_config.matrices]


def init(rng: jax.Array, model_config: CLIPConfig, lora_config: LoRAConfig) -> Params:
  """A fresh adapter: a ~ kaiming-uniform(a=sqrt(5)) as torch's Linear, b = 0.

  torch's kaiming-uniform with a = sqrt(5) on a (rank, in) weight is U(-1/sqrt(in), 1/sqrt(in)),
  with `in` the rows of `a`. With b = 0 the adapted model is exactly the base model.
  """
  lora: dict = {}
  keys = jax.random.split(rng, len(targets(model_config, lora_config)))
  for key, (tower, layer, matrix) in zip(keys, targets(model_config, lora_config)):
    a_shape, b_shape = lora_config.factor_shapes(model_config.tower(tower).width)
    bound = 1.0 / math.sqrt(a_shape[0])
    pair = {"a": jax.random.uniform(key, a_shape, jnp.float32, -bound, bound),
            "b": jnp.zeros(b_shape, jnp.float32)}
    lora.setdefault(tower, {}).setdefault(f"layers_{layer}", {}).setdefault("attn", {})[matrix] = pair
  return lora


def abstract_init(model_config: CLIPConfig, lora_config: LoRAConfig) -> Params:
  """The shapes and dtypes of `init`'s adapter, nothing allocated; a UserError when the LoRA
  config does not fit the architecture (a layer it lacks, blocks that do not divide a width)."""
  return jax.eval_shape(lambda key: init(key, model_config, lora_config), jax.random.key(0))


def _fold(params: Params, lora: Params, scale: float) -> Params:
  """params with `scale * a @ b` added to the kernel at the path of every pair in `lora` (an
  `a` with fewer rows than the kernel is shared by equal input chunks, as in `model.Dense`)."""
  def visit(p, l):
    if "a" in l and "b" in l:
      a = jnp.tile(l["a"].astype(jnp.float32), (p["kernel"].shape[0] // l["a"].shape[0], 1))
      delta = (a @ l["b"].astype(jnp.float32)) * scale
      return {**p, "kernel": (p["kernel"] + delta.astype(p["kernel"].dtype))}
    missing = set(l) - set(p)
    if missing:
      raise UserError(f"the adapter has entries {sorted(missing)} that the base model lacks: it "
                      "was made for another architecture")
    return {**p, **{k: visit(p[k], v) for k, v in l.items()}}
  return visit(params, lora)


def merge(params: Params, lora: Params, lora_config: LoRAConfig) -> Params:
  """Base params with the scaled low-rank updates folded into the kernels (plain-CLIP cost)."""
  return _fold(params, lora_config.pairs(lora), lora_config.scale)


def unmerge(params: Params, lora: Params, lora_config: LoRAConfig) -> Params:
  """The inverse of `merge` (up to float rounding)."""
  return _fold(params, lora_config.pairs(lora), -lora_config.scale)


def config_type(method: str) -> type[LoRAConfig]:
  """The adapter config class of a weight-space method; method `m` lives in module
  `clip_lora_jax.methods.m`, imported on first use."""
  if method not in ADAPTER_TYPES and method.isidentifier():
    try:
      importlib.import_module(f"clip_lora_jax.methods.{method}")
    except ModuleNotFoundError:
      pass
  if method not in ADAPTER_TYPES:
    raise UserError(f"method {method!r} has no weight-space adapter; known: "
                    f"{', '.join(sorted(ADAPTER_TYPES))}")
  return ADAPTER_TYPES[method]


def num_parameters(lora: Params) -> int:
  """Trainable parameter count of an adapter."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))


def base_fingerprint(params: Params) -> str:
  """A short hash of the base weights (both projections), to tell bases of one architecture apart."""
  digest = hashlib.sha256()
  for name in ("visual_projection", "text_projection"):
    digest.update(np.asarray(params[name]["kernel"], np.float32).tobytes())
  return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Adapter:
  """An adapter with what it takes to apply it: its config, the identity of its base, `few_shot`,
  the data a run trained it on (`few_shot_metadata`), and the prompt template it was trained
  with (each None in files written before it was recorded)."""
  lora: Params
  config: LoRAConfig
  base_name: str
  base_config: CLIPConfig
  base_fingerprint: str
  few_shot: dict[str, Any] | None = None
  template: str | None = None

  @property
  def method(self) -> str:
    """The method that trained it (`lora`, `block_lora`, ...)."""
    return self.config.method


def save_adapter(path: str, adapter: Adapter) -> None:
  """Writes the adapter as one safetensors file (metadata: LoRA config and base identity).

  Written to a temporary file in the same directory, then renamed: never half-written.
  """
  metadata = {"format": FORMAT, "method": adapter.config.method,
              "lora_config": json.dumps(adapter.config.to_dict()),
              **base_metadata(adapter.base_name, adapter.base_config, adapter.base_fingerprint),
              **few_shot_metadata(adapter.few_shot), **template_metadata(adapter.template)}
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(adapter.lora, sep=".").items()}
  files.write_safetensors(path, flat, metadata)


def load_adapter(path: str) -> Adapter:
  """Reads an adapter file written by `save_adapter`, checking its shapes against its config."""
  flat, metadata = files.read_safetensors(path)
  if metadata.get("format") != FORMAT:
    raise UserError(f"{path!r} is not a clip_lora_jax adapter file (no adapter metadata)")
  config_class = config_type(metadata.get("method", LoRAConfig.method))
  config = config_class.from_dict(json.loads(metadata["lora_config"]))
  base_name, base_config, fingerprint = base_from_metadata(metadata)
  lora = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="."))
  check_matches(lora, abstract_init(base_config, config), what=f"adapter {path!r}")
  return Adapter(lora, config, base_name, base_config, fingerprint,
                 few_shot_from_metadata(metadata), metadata.get("template"))


def base_metadata(base_name: str, base_config: CLIPConfig, fingerprint: str) -> dict[str, str]:
  """What an adapter file records of its base (every method's files: see `check_compatible`)."""
  return {"base_name": base_name, "base_config": json.dumps(dataclasses.asdict(base_config)),
          "base_fingerprint": fingerprint}


def template_metadata(template: str | None) -> dict[str, str]:
  """What an adapter file records of the prompt template it was trained with (eval.py's
  default prompts for it)."""
  return {} if template is None else {"template": template}


def base_from_metadata(metadata: dict[str, str]) -> tuple[str, CLIPConfig, str]:
  """The inverse of `base_metadata`: (name, architecture, fingerprint)."""
  return (metadata["base_name"], config_from_dict(json.loads(metadata["base_config"])),
          metadata["base_fingerprint"])


def few_shot_metadata(few_shot: dict[str, Any] | None) -> dict[str, str]:
  """What an adapter file records of the few-shot data it was trained on (every method's files):
  a run's dataset, shots, seed and sampler (`training.Run.few_shot`); nothing when unknown."""
  return {} if few_shot is None else {"few_shot": json.dumps(few_shot, sort_keys=True)}


def few_shot_from_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
  """The inverse of `few_shot_metadata` (None for a file that records none)."""
  return json.loads(metadata["few_shot"]) if "few_shot" in metadata else None


def check_matches(lora: Params, expected: Params, what: str) -> None:
  """Raises a UserError naming the first path whose presence or shape differs."""
  got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(lora, sep=".").items()}
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep=".").items()}
  for key in sorted(set(got) | set(want)):
    if got.get(key) != want.get(key):
      raise UserError(f"{what}: entry {key!r} has shape {got.get(key)} where {want.get(key)} is "
                      "expected (was it made for another architecture, rank or layer set?)")


def check_compatible(adapter: Any, base_name: str, base_config: CLIPConfig,
                     fingerprint: str, lora_config: LoRAConfig | None = None) -> None:
  """Raises a UserError when `adapter` (any method's: it has `base_name`, `base_config` and
  `base_fingerprint`) was not made for this base (or, for LoRA, for this LoRA config)."""
  if adapter.base_config != base_config:
    raise UserError(f"the adapter was trained on base {adapter.base_name!r} "
                    f"({adapter.base_config.name or 'custom architecture'}), whose architecture "
                    f"differs from the loaded base {base_name!r}; load that base instead")
  if adapter.base_fingerprint != fingerprint:
    raise UserError(f"the adapter was trained on base {adapter.base_name!r} (fingerprint "
                    f"{adapter.base_fingerprint}) but the loaded base {base_name!r} has other "
                    f"weights (fingerprint {fingerprint}); load the base it was trained on")
  if lora_config is not None and lora_config != adapter.config:
    raise UserError(f"the adapter's LoRA config {adapter.config} differs from the requested "
                    f"{lora_config}; drop the lora overrides or use a matching adapter")
