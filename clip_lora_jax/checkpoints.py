"""Import and export of CLIP weights: Hugging Face and OpenAI / OpenCLIP layouts.

Each layout is described once, as a table of entries `source key <-> leaves of our parameter
pytree` with a named transform (copy, Linear transpose, conv transpose, fused q/k/v split). Import
and export are the two directions of the same table, so the Hugging Face round trip is the
identity by construction. Expected shapes come from the model itself (`model.param_shapes`,
traced), so a checkpoint that does not fit the architecture is reported by key with
both shapes before anything is converted.

Everything here runs on numpy and safetensors' numpy backend: no torch at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import huggingface_hub
import numpy as np
import safetensors.numpy
import transformers
from flax import traverse_util

from clip_lora_jax import files
from clip_lora_jax import model as model_lib
from clip_lora_jax import tokenizer as tokenizer_lib
from clip_lora_jax.errors import UserError

Path = tuple[str, ...]
State = Mapping[str, np.ndarray]

# Hub checkpoints of the named OpenAI architectures.
HUB_IDS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14-336": "openai/clip-vit-large-patch14-336",
}
# What `snapshot_download` fetches of a hub checkpoint: config, weights, tokenizer files.
HUB_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]
# OpenCLIP hub checkpoints ('hf-hub:owner/name', open_clip's naming): config and safetensors
# weights; their pickled twin (OPENCLIP_PICKLE) is never read.
OPENCLIP_HUB_PREFIX = "hf-hub:"
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
OPENCLIP_PICKLE = "open_clip_pytorch_model.bin"
OPENCLIP_HUB_FILES = [OPENCLIP_CONFIG, OPENCLIP_WEIGHTS]
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
# The prompt template a merged model was trained with, next to its Hugging Face files.
PROMPT_FILE = "clip_lora_jax.json"
ACTIVATIONS = ("quick_gelu", "gelu")
# Buffers some checkpoints carry that are not weights: HF position ids, OpenAI JIT metadata.
_IGNORED_HF_KEY = re.compile(r".*\.position_ids$")
_IGNORED_OPENCLIP_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ------------------------------------------------------------------------------------------------
# Layout tables.


@dataclasses.dataclass(frozen=True)
class _Transform:
  """A source array <-> one or more of our leaves, both directions."""
  to_ours: Callable[[np.ndarray], list[np.ndarray]]
  to_source: Callable[[Sequence[np.ndarray]], np.ndarray]


_TRANSFORMS = {
    "copy": _Transform(lambda x: [x], lambda xs: xs[0]),
    # torch Linear (out, in) <-> Flax kernel (in, out).
    "linear": _Transform(lambda x: [x.T], lambda xs: xs[0].T),
    # torch conv (O, I, kh, kw) <-> Flax conv kernel (kh, kw, I, O).
    "conv": _Transform(lambda x: [x.transpose(2, 3, 1, 0)], lambda xs: xs[0].transpose(3, 2, 0, 1)),
    # torch MultiheadAttention fused in_proj (3W, W) <-> q, k, v kernels (W, W) each.
    "fused_linear": _Transform(lambda x: [w.T for w in np.split(x, 3)],
                               lambda xs: np.concatenate([w.T for w in xs])),
    "fused_bias": _Transform(lambda x: np.split(x, 3), np.concatenate),
}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One source key, the leaf paths of our pytree it holds, and the transform between them."""
  key: str
  paths: tuple[Path, ...]
  transform: str = "copy"


def _norm(path: Path, key: str) -> list[_Entry]:
  return [_Entry(f"{key}.weight", (path + ("scale",),)), _Entry(f"{key}.bias", (path + ("bias",),))]


def _dense(path: Path, key: str) -> list[_Entry]:
  return [_Entry(f"{key}.weight", (path + ("kernel",),), "linear"),
          _Entry(f"{key}.bias", (path + ("bias",),))]


def _block(path: Path, key: str, names: Mapping[str, str], fused_qkv: bool) -> list[_Entry]:
  """One residual block; `names` maps our sub-module names to the source's."""
  entries = [*_norm(path + ("ln_1",), f"{key}.{names['ln_1']}"),
             *_norm(path + ("ln_2",), f"{key}.{names['ln_2']}"),
             *_dense(path + ("attn", "o"), f"{key}.{names['o']}"),
             *_dense(path + ("mlp", "fc1"), f"{key}.{names['fc1']}"),
             *_dense(path + ("mlp", "fc2"), f"{key}.{names['fc2']}")]
  if fused_qkv:
    qkv = [path + ("attn", name) for name in ("q", "k", "v")]
    entries += [
        _Entry(f"{key}.attn.in_proj_weight", tuple(p + ("kernel",) for p in qkv), "fused_linear"),
        _Entry(f"{key}.attn.in_proj_bias", tuple(p + ("bias",) for p in qkv), "fused_bias")]
  else:
    for name in ("q", "k", "v"):
      entries += _dense(path + ("attn", name), f"{key}.self_attn.{name}_proj")
  return entries


_HF_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "o": "self_attn.out_proj",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_OPENCLIP_BLOCK = {"ln_1": "ln_1", "ln_2": "ln_2", "o": "attn.out_proj",
                   "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}


def _hf_layout(cfg: model_lib.CLIPConfig) -> list[_Entry]:
  """The Hugging Face `CLIPModel` state dict."""
  blocks = lambda tower, prefix, n: [e for i in range(n) for e in _block(
      (tower, f"layers_{i}"), f"{prefix}.encoder.layers.{i}", _HF_BLOCK, fused_qkv=False)]
  return [
      _Entry("vision_model.embeddings.patch_embedding.weight",
             (("vision", "patch_embedding", "kernel"),), "conv"),
      _Entry("vision_model.embeddings.class_embedding", (("vision", "class_embedding"),)),
      _Entry("vision_model.embeddings.position_embedding.weight",
             (("vision", "position_embedding"),)),
      *_norm(("vision", "ln_pre"), "vision_model.pre_layrnorm"),  # sic
      *blocks("vision", "vision_model", cfg.vision.layers),
      *_norm(("vision", "ln_post"), "vision_model.post_layernorm"),
      _Entry("text_model.embeddings.token_embedding.weight",
             (("text", "token_embedding", "embedding"),)),
      _Entry("text_model.embeddings.position_embedding.weight", (("text", "position_embedding"),)),
      *blocks("text", "text_model", cfg.text.layers),
      *_norm(("text", "ln_final"), "text_model.final_layer_norm"),
      _Entry("visual_projection.weight", (("visual_projection", "kernel"),), "linear"),
      _Entry("text_projection.weight", (("text_projection", "kernel"),), "linear"),
      _Entry("logit_scale", (("logit_scale",),)),
  ]


def _openclip_layout(cfg: model_lib.CLIPConfig) -> list[_Entry]:
  """The OpenAI CLIP / OpenCLIP state dict (projections are stored in `x @ proj` orientation)."""
  blocks = lambda tower, prefix, n: [e for i in range(n) for e in _block(
      (tower, f"layers_{i}"), f"{prefix}transformer.resblocks.{i}", _OPENCLIP_BLOCK,
      fused_qkv=True)]
  return [
      _Entry("visual.conv1.weight", (("vision", "patch_embedding", "kernel"),), "conv"),
      _Entry("visual.class_embedding", (("vision", "class_embedding"),)),
      _Entry("visual.positional_embedding", (("vision", "position_embedding"),)),
      *_norm(("vision", "ln_pre"), "visual.ln_pre"),
      *blocks("vision", "visual.", cfg.vision.layers),
      *_norm(("vision", "ln_post"), "visual.ln_post"),
      _Entry("visual.proj", (("visual_projection", "kernel"),)),
      _Entry("token_embedding.weight", (("text", "token_embedding", "embedding"),)),
      _Entry("positional_embedding", (("text", "position_embedding"),)),
      *blocks("text", "", cfg.text.layers),
      *_norm(("text", "ln_final"), "ln_final"),
      _Entry("text_projection", (("text_projection", "kernel"),)),
      _Entry("logit_scale", (("logit_scale",),)),
  ]


# ------------------------------------------------------------------------------------------------
# Conversion with validation.


@functools.lru_cache(maxsize=8)
def param_shapes(cfg: model_lib.CLIPConfig) -> dict[Path, tuple[int, ...]]:
  """Leaf path -> shape of the model's parameters for `cfg` (traced, nothing allocated)."""
  return {path: tuple(leaf.shape)
          for path, leaf in traverse_util.flatten_dict(model_lib.param_shapes(cfg)).items()}


def _source_shape(entry: _Entry, shapes: Mapping[Path, tuple[int, ...]]) -> tuple[int, ...]:
  """The shape `entry.key` must have: our leaves' shapes sent through the export transform on
  zero-copy placeholders."""
  placeholders = [np.broadcast_to(np.float32(0), shapes[p]) for p in entry.paths]
  return _TRANSFORMS[entry.transform].to_source(placeholders).shape


def _describe(cfg: model_lib.CLIPConfig) -> str:
  return f"architecture {cfg.name!r}" if cfg.name else "the given architecture"


def _check_keys(found: set[str], expected: set[str], what: str, cfg: model_lib.CLIPConfig) -> None:
  """Raises UserError listing missing and unexpected keys, if any."""
  missing, unexpected = sorted(expected - found), sorted(found - expected)
  if not (missing or unexpected):
    return
  show = lambda keys: ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")
  problems = ([f"missing keys: {show(missing)}"] if missing else []) + (
      [f"unexpected keys: {show(unexpected)}"] if unexpected else [])
  raise UserError(f"{what} does not match {_describe(cfg)}: {'; '.join(problems)}. Check that the "
                  "checkpoint's layout and config belong to this model.")


def _import(state: State, layout: list[_Entry], cfg: model_lib.CLIPConfig, what: str,
            ignored: Callable[[str], bool]) -> dict:
  """Validates `state` against `layout` and converts it into our parameter pytree (float32)."""
  shapes = param_shapes(cfg)
  _check_keys({k for k in state if not ignored(k)}, {e.key for e in layout}, what, cfg)
  flat = {}
  for entry in layout:
    array = np.asarray(state[entry.key])
    expected = _source_shape(entry, shapes)
    if array.shape != expected:
      raise UserError(f"{what} key {entry.key!r}: expected shape {expected} for "
                      f"{_describe(cfg)}, found {array.shape}.")
    leaves = _TRANSFORMS[entry.transform].to_ours(array)
    flat.update((path, np.array(leaf, np.float32, order="C"))
                for path, leaf in zip(entry.paths, leaves))
  return traverse_util.unflatten_dict(flat)


def _export(params: Mapping[str, Any], layout: list[_Entry], cfg: model_lib.CLIPConfig) -> dict:
  """Validates our pytree against `cfg` and converts it into the source layout's state dict."""
  shapes = param_shapes(cfg)
  flat = {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(params).items()}
  join = "/".join
  _check_keys({join(p) for p in flat}, {join(p) for p in shapes}, "the parameter pytree", cfg)
  for path, shape in shapes.items():
    if flat[path].shape != shape:
      raise UserError(f"parameter {join(path)!r}: expected shape {shape} for {_describe(cfg)}, "
                      f"found {flat[path].shape}.")
  to_source = lambda e: _TRANSFORMS[e.transform].to_source([flat[p] for p in e.paths])
  return {e.key: np.asarray(to_source(e), order="C") for e in layout}


def params_from_hf(state: State, cfg: model_lib.CLIPConfig) -> dict:
  """Our parameter pytree from a Hugging Face `CLIPModel` state dict (`*.position_ids` ignored)."""
  return _import(state, _hf_layout(cfg), cfg, "Hugging Face checkpoint",
                 lambda k: bool(_IGNORED_HF_KEY.match(k)))


def params_to_hf(params: Mapping[str, Any], cfg: model_lib.CLIPConfig) -> dict[str, np.ndarray]:
  """A Hugging Face `CLIPModel` state dict from our parameters (exact inverse of params_from_hf)."""
  return _export(params, _hf_layout(cfg), cfg)


def hf_linear_modules(cfg: model_lib.CLIPConfig) -> dict[Path, str]:
  """The Hugging Face `CLIPModel` module name of every Linear of ours, by our path to its kernel's
  parent: ('text', 'layers_1', 'attn', 'q') -> 'text_model.encoder.layers.1.self_attn.q_proj', for
  files that name modules rather than weights (PEFT adapters: `clip_lora_jax.peft`)."""
  return {e.paths[0][:-1]: e.key.removesuffix(".weight")
          for e in _hf_layout(cfg) if e.transform == "linear"}


def params_from_openclip(state: State, cfg: model_lib.CLIPConfig) -> dict:
  """Our parameter pytree from an OpenAI CLIP / OpenCLIP state dict (fused q, k, v are split)."""
  return _import(state, _openclip_layout(cfg), cfg, "OpenCLIP checkpoint",
                 lambda k: k in _IGNORED_OPENCLIP_KEYS)


# ------------------------------------------------------------------------------------------------
# Configs.


def _named(cfg: model_lib.CLIPConfig) -> model_lib.CLIPConfig:
  """`cfg` named after the known architecture it equals, if any."""
  for name, known in model_lib.ARCHITECTURES.items():
    if dataclasses.replace(known, name="") == dataclasses.replace(cfg, name=""):
      return dataclasses.replace(cfg, name=name)
  return cfg


def _checked(cfg: model_lib.CLIPConfig, where: str) -> model_lib.CLIPConfig:
  """`cfg` named after the known architecture it equals, once its sizes are checked to be sane
  (before anything is traced or allocated for it)."""
  model_lib.check_sizes(cfg, where)
  return _named(cfg)


def _activation(act: str, where: str) -> str:
  if act not in ACTIVATIONS:
    raise UserError(f"{where}: activation {act!r} is not supported; use one of {ACTIVATIONS}.")
  return act


def config_from_hf(config_dict: Mapping[str, Any]) -> model_lib.CLIPConfig:
  """Our config from a Hugging Face CLIP `config.json` dict.

  The dict is read by `transformers.CLIPConfig`, so missing keys take transformers' defaults
  (those of ViT-B/32) and legacy `text_config_dict` / `vision_config_dict` entries are honoured.
  The result is named after the known architecture it equals (e.g. 'ViT-B/16'), if any.
  """
  if config_dict.get("model_type", "clip") != "clip":
    raise UserError(f"config.json has model_type {config_dict['model_type']!r}; only CLIP "
                    "checkpoints (model_type 'clip') are supported.")
  try:
    hf = transformers.CLIPConfig.from_dict(dict(config_dict))
  except (ValueError, TypeError, huggingface_hub.errors.StrictDataclassError) as e:
    raise UserError(f"invalid CLIP config.json: {e}") from e
  text, vision = hf.text_config, hf.vision_config
  acts = {_activation(text.hidden_act, "config.json text_config.hidden_act"),
          _activation(vision.hidden_act, "config.json vision_config.hidden_act")}
  if len(acts) > 1 or text.layer_norm_eps != vision.layer_norm_eps:
    raise UserError("config.json: the text and vision towers use different hidden_act or "
                    "layer_norm_eps; clip_lora_jax needs one value for both.")
  if vision.num_channels != 3:
    raise UserError(f"config.json: vision_config.num_channels is {vision.num_channels}; only RGB "
                    "images (3 channels) are supported.")
  image_size, patch_size = (_square(vision, k) for k in ("image_size", "patch_size"))
  return _checked(model_lib.CLIPConfig(
      embed_dim=hf.projection_dim,
      vision=model_lib.VisionConfig(width=vision.hidden_size, layers=vision.num_hidden_layers,
                                    heads=vision.num_attention_heads,
                                    mlp_dim=vision.intermediate_size, image_size=image_size,
                                    patch_size=patch_size),
      text=model_lib.TextConfig(width=text.hidden_size, layers=text.num_hidden_layers,
                                heads=text.num_attention_heads, mlp_dim=text.intermediate_size,
                                vocab_size=text.vocab_size,
                                context_length=text.max_position_embeddings),
      activation=acts.pop(), layer_norm_eps=float(text.layer_norm_eps)), "config.json")


def _square(vision: transformers.CLIPVisionConfig, key: str) -> int:
  """An image or patch size that may be written as [h, w]: must be square."""
  value = getattr(vision, key)
  sizes = set(value) if isinstance(value, (list, tuple)) else {value}
  if len(sizes) != 1:
    raise UserError(f"config.json: vision_config.{key} is {value}; only square sizes are "
                    "supported.")
  return int(sizes.pop())


def config_to_hf(cfg: model_lib.CLIPConfig) -> dict[str, Any]:
  """A Hugging Face CLIP `config.json` dict for `cfg` (the inverse of config_from_hf).

  The end token is the largest id (vocab_size - 1) and the start token the one before, as in
  CLIP's vocabulary, so transformers pools text where we do.
  """
  tower = lambda t: {"hidden_size": t.width, "intermediate_size": t.mlp_dim,
                     "num_attention_heads": t.heads, "num_hidden_layers": t.layers,
                     "hidden_act": cfg.activation, "layer_norm_eps": cfg.layer_norm_eps,
                     "projection_dim": cfg.embed_dim}
  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": cfg.embed_dim,
      "text_config": {**tower(cfg.text), "vocab_size": cfg.text.vocab_size,
                      "max_position_embeddings": cfg.text.context_length,
                      "bos_token_id": cfg.text.vocab_size - 2,
                      "eos_token_id": cfg.text.vocab_size - 1},
      "vision_config": {**tower(cfg.vision), "image_size": cfg.vision.image_size,
                        "patch_size": cfg.vision.patch_size, "num_channels": 3},
  }


def config_from_openclip(state: State, activation: str = "quick_gelu") -> model_lib.CLIPConfig:
  """Infers the architecture of an OpenAI CLIP / OpenCLIP state dict from its shapes alone, as
  OpenAI's `build_model` does: every attention head is assumed 64 wide.

  That holds for OpenAI's models, not for all of OpenCLIP's: LAION's ViT-H/14, ViT-g/14,
  ViT-bigG/14 and ViT-e/14 have 80, 88, 104 and 112-wide vision heads, which no shape shows.
  Their vision widths are refused here; load them with their `open_clip_config.json`
  (`config_from_openclip_json`). The activation cannot be read from weights either: OpenAI's
  models use quick_gelu, most LAION models plain gelu.
  """
  def shape(key: str) -> tuple[int, ...]:
    if key not in state:
      raise UserError(f"not an OpenAI / OpenCLIP CLIP state dict: key {key!r} is missing (ResNet "
                      "and custom-text-tower OpenCLIP models are not supported).")
    return tuple(np.shape(state[key]))

  def layers(prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state
                if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})

  def heads(tower: str, width: int) -> int:
    known = _NOT_64_WIDE.get(width) if tower == "vision" else None
    if width % 64 or known:
      reason = (f"it is the width of OpenCLIP's {known}-wide heads" if known
                else "not a multiple of 64")
      raise UserError(f"the OpenCLIP state dict's {tower} width is {width} ({reason}): its number "
                      f"of attention heads cannot be inferred from shapes. Put the model's "
                      f"{OPENCLIP_CONFIG} next to the weights file.")
    return width // 64

  vision_prefix, text_prefix = "visual.transformer.resblocks.", "transformer.resblocks."
  vision_width, _, patch_size, _ = shape("visual.conv1.weight")
  grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
  text_width = shape("ln_final.weight")[0]
  mlp_dim = lambda prefix: shape(f"{prefix}0.mlp.c_fc.weight")[0]
  return _checked(model_lib.CLIPConfig(
      embed_dim=shape("text_projection")[1],
      vision=model_lib.VisionConfig(width=vision_width, layers=layers(vision_prefix),
                                    heads=heads("vision", vision_width),
                                    mlp_dim=mlp_dim(vision_prefix),
                                    image_size=grid * patch_size, patch_size=patch_size),
      text=model_lib.TextConfig(width=text_width, layers=layers(text_prefix),
                                heads=heads("text", text_width), mlp_dim=mlp_dim(text_prefix),
                                vocab_size=shape("token_embedding.weight")[0],
                                context_length=shape("positional_embedding")[0]),
      activation=_activation(activation, "config_from_openclip")), "the OpenCLIP state dict")


# Vision widths of OpenCLIP ViTs whose heads are not 64 wide (ViT-H/14 and ViT-H/16, ViT-g/14,
# ViT-bigG/14, ViT-e/14) -> their head width; all are multiples of 64, so shapes alone mislead.
_NOT_64_WIDE = {1280: 80, 1408: 88, 1664: 104, 1792: 112}

# open_clip's model config (`open_clip_config.json`: `model_cfg`, `preprocess_cfg`), as of
# open_clip 3.3 (model.py: CLIP, CLIPVisionCfg, CLIPTextCfg; transform.py: PreprocessCfg).
# _READ: the keys the architecture is made of, with open_clip's defaults.
_READ: dict[str, dict[str, Any]] = {
    "model_cfg": {"embed_dim": None, "quick_gelu": False, "vision_cfg": {}, "text_cfg": {}},
    "vision_cfg": {"width": 768, "layers": 12, "head_width": 64, "mlp_ratio": 4.0,
                   "patch_size": 16, "image_size": 224},
    "text_cfg": {"width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0, "context_length": 77,
                 "vocab_size": 49408},
    "preprocess_cfg": {"mean": model_lib.CLIP_MEAN, "std": model_lib.CLIP_STD},
}
_OFF, _EMPTY = (None, False), (None, {})
# Residual-block features of either tower: key -> (what it is, the values that leave it off).
_BLOCK_FEATURES = {
    "ls_init_value": ("layer scale", (None,)),
    "act_kwargs": ("activation arguments", _EMPTY),
    "norm_kwargs": ("LayerNorm arguments", _EMPTY),
    "block_type": ("custom residual blocks", (None, "default")),
    "qk_norm": ("q/k LayerNorm", _OFF),
    "scaled_cosine_attn": ("scaled cosine attention", _OFF),
    "scale_heads": ("per-head attention scales", _OFF),
    "scale_attn_inner": ("LayerNorm inside attention", _OFF),
    "scale_attn": ("LayerNorm after attention", _OFF),
    "scale_fc": ("LayerNorm inside the MLP", _OFF),
}
# _UNSUPPORTED: features clip_lora_jax does not implement, refused unless they are off.
_UNSUPPORTED: dict[str, dict[str, tuple[str, tuple[Any, ...]]]] = {
    "model_cfg": {
        "custom_text": ("a custom text tower (CustomTextCLIP)", _OFF),
        "multimodal_cfg": ("a multimodal text decoder (CoCa)", (None,)),
        "init_logit_bias": ("a logit bias (SigLIP's sigmoid loss)", (None,)),
        "nonscalar_logit_scale": ("a non-scalar logit scale", _OFF),
    },
    "vision_cfg": {
        **_BLOCK_FEATURES,
        "attentional_pool": ("attentional pooling", _OFF),
        "no_ln_pre": ("a vision tower without ln_pre", _OFF),
        "pos_embed_type": ("fixed position embeddings", ("learnable",)),
        "pool_type": ("pooling other than at the class token ('tok')", ("tok",)),
        "timm_model_name": ("a timm image tower", (None,)),
        "global_average_pool": ("average pooling", _OFF),
        "input_patchnorm": ("patch LayerNorm", _OFF),
    },
    "text_cfg": {
        **_BLOCK_FEATURES,
        "hf_model_name": ("a Hugging Face text tower", (None,)),
        "hf_tokenizer_name": ("a tokenizer other than CLIP's", (None,)),
        "tokenizer_mode": ("a tokenizer other than CLIP's", (None,)),
        "tokenizer_kwargs": ("tokenizer arguments", _EMPTY),
        "embed_cls": ("a text class token (CoCa)", _OFF),
        "no_causal_mask": ("bidirectional text attention", _OFF),
        "pool_type": ("pooling other than at the end token ('argmax')", ("argmax",)),
        "proj_type": ("a text projection other than a matrix", ("linear",)),
        "proj_bias": ("a text projection bias", _OFF),
    },
    "preprocess_cfg": {
        "mode": ("images other than RGB", ("RGB",)),
        "interpolation": ("resizing other than bicubic", ("bicubic",)),
        "resize_mode": ("resizing other than shortest side then centre crop", ("shortest",)),
    },
}
# _INERT: keys that change nothing the weights compute at inference: training-only settings,
# output formats, settings of refused features, the input size (open_clip takes the model's),
# and `final_ln_after_pool` (LayerNorm acts on each token alone: normalising the pooled token is
# pooling the normalised tokens; open_clip's CLIP.encode_text ignores it).
_INERT: dict[str, frozenset[str]] = {
    "model_cfg": frozenset({"init_logit_scale", "cast_dtype", "output_dict"}),
    "vision_cfg": frozenset({"patch_dropout", "output_tokens", "final_ln_after_pool",
                             "attn_pooler_queries", "attn_pooler_heads", "n_queries",
                             "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                             "timm_drop", "timm_drop_path"}),
    "text_cfg": frozenset({"output_tokens", "final_ln_after_pool", "pad_id", "eos_id",
                           "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "proj",
                           "pooler_type"}),
    "preprocess_cfg": frozenset({"size", "fill_color"}),
}


def _openclip_section(value: Any, name: str, where: str) -> dict[str, Any]:
  """The keys of section `name` that make the architecture (open_clip's defaults filled in), once
  every other key is known and every unsupported feature in it is off."""
  if not isinstance(value, Mapping):
    raise UserError(f"{where}: {name} must be a JSON object, found {value!r}.")
  for key, setting in value.items():
    if key in _UNSUPPORTED[name]:
      what, off = _UNSUPPORTED[name][key]
      if not any(setting == o and type(setting) is type(o) for o in off):
        raise UserError(f"{where}: {name}.{key}={setting!r} asks for {what}, which clip_lora_jax "
                        "does not implement; only CLIP ViTs of OpenAI's design load.")
    elif key not in _READ[name] and key not in _INERT[name]:
      raise UserError(f"{where}: unknown key {name}.{key} (clip_lora_jax reads open_clip 3.3's "
                      "model configs and refuses what it cannot check).")
  return {**_READ[name], **{k: v for k, v in value.items() if k in _READ[name]}}


def config_from_openclip_json(config: Mapping[str, Any], where: str = OPENCLIP_CONFIG
                              ) -> model_lib.CLIPConfig:
  """Our config from an OpenCLIP model config (`open_clip_config.json`: `model_cfg` and
  `preprocess_cfg`), as open_clip builds it: vision heads = width / head_width, text heads =
  `heads`, MLP widths int(width * mlp_ratio), gelu unless `quick_gelu`; missing keys take
  open_clip's defaults.

  Every feature clip_lora_jax does not implement (layer scale, attentional or average pooling,
  custom text towers, timm or ResNet image towers, a normalisation other than CLIP's mean and
  std, ...) is refused by name, as are unknown keys: nothing loads into a model that would
  compute something else. `where` names the file in messages.
  """
  if not isinstance(config, Mapping) or "model_cfg" not in config:
    raise UserError(f"{where}: not an OpenCLIP model config (no model_cfg).")
  if unknown := sorted(set(config) - {"model_cfg", "preprocess_cfg"}):
    raise UserError(f"{where}: unknown keys {unknown} (expected model_cfg and preprocess_cfg).")
  model_cfg = _openclip_section(config["model_cfg"], "model_cfg", where)
  vision = _openclip_section(model_cfg["vision_cfg"], "vision_cfg", where)
  text = _openclip_section(model_cfg["text_cfg"], "text_cfg", where)
  preprocess = _openclip_section(config.get("preprocess_cfg", {}), "preprocess_cfg", where)
  if isinstance(vision["layers"], (list, tuple)):
    raise UserError(f"{where}: vision_cfg.layers={vision['layers']} asks for a ResNet image "
                    "tower, which clip_lora_jax does not implement; only CLIP ViTs load.")
  for key, ours in (("mean", model_lib.CLIP_MEAN), ("std", model_lib.CLIP_STD)):
    value = preprocess[key]
    if not (isinstance(value, Sequence) and len(value) == 3
            and all(isinstance(v, (int, float)) for v in value)
            and np.allclose(value, ours, rtol=0, atol=1e-6)):
      raise UserError(f"{where}: preprocess_cfg.{key}={value!r} is not CLIP's {list(ours)}; "
                      "clip_lora_jax normalises images with CLIP's mean and std only.")
  if not isinstance(model_cfg["quick_gelu"], bool):
    raise UserError(f"{where}: model_cfg.quick_gelu={model_cfg['quick_gelu']!r} must be true or "
                    "false.")
  for name, section, key in (("vision_cfg", vision, "width"), ("vision_cfg", vision, "head_width"),
                             ("vision_cfg", vision, "mlp_ratio"), ("text_cfg", text, "width"),
                             ("text_cfg", text, "mlp_ratio")):
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
        key != "mlp_ratio" and not isinstance(value, int)):
      raise UserError(f"{where}: {name}.{key}={value!r} must be a positive number"
                      f"{'' if key == 'mlp_ratio' else ' (an integer)'}.")
  if vision["width"] % vision["head_width"]:
    raise UserError(f"{where}: vision_cfg.width={vision['width']} is not a multiple of "
                    f"vision_cfg.head_width={vision['head_width']}.")
  return _checked(model_lib.CLIPConfig(
      embed_dim=model_cfg["embed_dim"],
      vision=model_lib.VisionConfig(
          width=vision["width"], layers=vision["layers"],
          heads=vision["width"] // vision["head_width"],
          mlp_dim=int(vision["width"] * vision["mlp_ratio"]),
          image_size=_openclip_square(vision["image_size"], "image_size", where),
          patch_size=_openclip_square(vision["patch_size"], "patch_size", where)),
      text=model_lib.TextConfig(width=text["width"], layers=text["layers"], heads=text["heads"],
                                mlp_dim=int(text["width"] * text["mlp_ratio"]),
                                vocab_size=text["vocab_size"],
                                context_length=text["context_length"]),
      activation="quick_gelu" if model_cfg["quick_gelu"] else "gelu"), where)


def _openclip_square(value: Any, key: str, where: str) -> Any:
  """An image or patch size of open_clip (an int, or [h, w] with h = w)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise UserError(f"{where}: vision_cfg.{key}={value!r}; only square sizes are supported.")
    return value[0]
  return value


# ------------------------------------------------------------------------------------------------
# Files.


def load_pretrained(name_or_path: str, *, openclip_activation: str | None = None
                    ) -> tuple[model_lib.CLIPConfig, dict]:
  """Loads a CLIP checkpoint as (config, float32 parameter pytree).

  Args:
    name_or_path: one of
      * a named architecture ('ViT-B/32', 'ViT-B/16', 'ViT-L/14', 'ViT-L/14-336'): OpenAI's
        weights from the Hugging Face hub (see HUB_IDS);
      * a local directory in Hugging Face layout (`config.json` + `model.safetensors`, or shards
        listed in `model.safetensors.index.json`);
      * a Hugging Face hub id such as 'openai/clip-vit-base-patch16' (downloaded into the hub
        cache, or read from it when HF_HUB_OFFLINE=1);
      * an OpenCLIP hub id such as 'hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K', as open_clip
        names them: its `open_clip_config.json` and `open_clip_model.safetensors`, fetched like a
        hub id; or a local directory holding these two files (and no `config.json`);
      * a single OpenAI / OpenCLIP `.safetensors` file. With an `open_clip_config.json` next to
        it, the architecture is that config's (`config_from_openclip_json`: head widths, MLP
        widths, activation; features we do not implement are refused) and the weights' shapes
        must fit it; without one, it is inferred from the shapes with OpenAI's 64-wide heads
        (`config_from_openclip`), which suits OpenAI's models only.
      Pickled weights (`.bin`, `.pt`) are never read.
    openclip_activation: for an OpenCLIP file without `open_clip_config.json` only, 'quick_gelu'
      (the default: OpenAI's weights) or 'gelu' (most LAION models). With a config, it may only
      repeat the config's `quick_gelu`.
  """
  if name_or_path in model_lib.ARCHITECTURES and name_or_path not in HUB_IDS:
    raise UserError(f"architecture {name_or_path!r} has no pretrained weights (it is a test "
                    "architecture): use clip_lora_jax.model.init_params for random weights.")
  source = HUB_IDS.get(name_or_path, name_or_path)
  if source.startswith(OPENCLIP_HUB_PREFIX):
    repo_id = source[len(OPENCLIP_HUB_PREFIX):]
    if not _HUB_ID.match(repo_id):
      raise UserError(f"{source!r}: expected {OPENCLIP_HUB_PREFIX}owner/name, e.g. "
                      f"{OPENCLIP_HUB_PREFIX}laion/CLIP-ViT-H-14-laion2B-s32B-b79K.")
    return _load_openclip_dir(_download(repo_id, OPENCLIP_HUB_FILES, source),
                              openclip_activation)
  if os.path.isdir(source):
    if not os.path.isfile(os.path.join(source, HF_CONFIG)) and os.path.isfile(
        os.path.join(source, OPENCLIP_CONFIG)):
      return _load_openclip_dir(source, openclip_activation)
    return _load_hf_dir(source)
  if os.path.isfile(source):
    return _load_openclip_file(source, openclip_activation)
  if _HUB_ID.match(source) and not source.startswith("."):
    return _load_hf_dir(_download(source, HUB_FILES))
  known = ", ".join(HUB_IDS)
  raise UserError(f"checkpoint {name_or_path!r} not found: it is neither an existing directory or "
                  f"file, nor a hub id (owner/name, or {OPENCLIP_HUB_PREFIX}owner/name for "
                  f"OpenCLIP), nor a named architecture ({known}).")


def _download(repo_id: str, patterns: list[str], name: str | None = None) -> str:
  """The local snapshot of hub repository `repo_id`, limited to the files `patterns` match.
  `name`: what the user asked for, when not the bare id."""
  try:
    return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
  except (OSError, ValueError) as e:  # offline, no network, unknown or gated repo, bad id
    asked = (f"{name!r}" if name else
             f"{repo_id!r} is neither a local path nor a named architecture "
             f"({', '.join(HUB_IDS)}), and as a Hugging Face hub id it")
    includes = " ".join(f'--include "{p}"' for p in patterns)
    raise UserError(
        f"{asked} could not be fetched ({type(e).__name__}: {e}). Without network access, "
        f"download it on a machine that has one (`hf download {repo_id} {includes} --local-dir "
        "DIR`) and pass DIR, or point HF_HOME at a hub cache that holds it (HF_HUB_OFFLINE=1 "
        "skips the network).") from e


def _load_hf_dir(directory: str) -> tuple[model_lib.CLIPConfig, dict]:
  """(config, params) of a Hugging Face checkpoint directory."""
  config_path = os.path.join(directory, HF_CONFIG)
  if not os.path.isfile(config_path):
    raise UserError(f"{directory!r} has no {HF_CONFIG} (nor {OPENCLIP_CONFIG}): not a Hugging Face "
                    "(nor an OpenCLIP) checkpoint directory.")
  try:
    with open(config_path) as f:
      cfg = config_from_hf(json.load(f))
  except json.JSONDecodeError as e:
    raise UserError(f"{config_path!r} is not valid JSON: {e}") from e
  return cfg, params_from_hf(_read_hf_weights(directory), cfg)


def _read_hf_weights(directory: str) -> dict[str, np.ndarray]:
  """The tensors of `model.safetensors`, or of all shards of `model.safetensors.index.json`."""
  single, index = (os.path.join(directory, f) for f in (HF_WEIGHTS, HF_WEIGHTS_INDEX))
  if os.path.isfile(single):
    return _read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = [_read_safetensors(os.path.join(directory, shard)) for shard in shards]
    return {k: v for shard_tensors in tensors for k, v in shard_tensors.items()}
  raise UserError(f"{directory!r} has no {HF_WEIGHTS} (nor {HF_WEIGHTS_INDEX}); only safetensors "
                  "weights are read. Re-save the model with `save_pretrained(dir)` (safetensors is "
                  "the default) or convert its pytorch_model.bin.")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except (OSError, ValueError, safetensors.SafetensorError) as e:
    raise UserError(f"could not read safetensors file {path!r}: {e}") from e


def _load_openclip_dir(directory: str, activation: str | None) -> tuple[model_lib.CLIPConfig, dict]:
  """(config, params) of an OpenCLIP directory (`open_clip_config.json` and
  `open_clip_model.safetensors`, as open_clip's hub repositories hold them)."""
  weights = os.path.join(directory, OPENCLIP_WEIGHTS)
  if not os.path.isfile(os.path.join(directory, OPENCLIP_CONFIG)):
    raise UserError(f"{directory!r} has no {OPENCLIP_CONFIG}: not an OpenCLIP checkpoint.")
  if not os.path.isfile(weights):
    pickled = os.path.isfile(os.path.join(directory, OPENCLIP_PICKLE))
    raise UserError(
        f"{directory!r} has no {OPENCLIP_WEIGHTS}"
        + (f", only the pickled {OPENCLIP_PICKLE}" if pickled else "")
        + f"; weights are read from safetensors only, never from pickles such as {OPENCLIP_PICKLE} "
        "(they can run code). Convert one on a machine you trust: "
        f"safetensors.torch.save_file(torch.load(path), '{OPENCLIP_WEIGHTS}').")
  return _load_openclip_file(weights, activation)


def _load_openclip_file(path: str, activation: str | None) -> tuple[model_lib.CLIPConfig, dict]:
  """(config, params) of a single OpenAI / OpenCLIP `.safetensors` file, with the architecture of
  the `open_clip_config.json` next to it if there is one."""
  if not path.endswith(".safetensors"):
    raise UserError(f"{path!r}: only .safetensors checkpoint files are read (no pickled torch "
                    "files); convert it with safetensors.torch.save_file, or pass a Hugging Face "
                    "checkpoint directory.")
  config_path = os.path.join(os.path.dirname(path), OPENCLIP_CONFIG)
  if not os.path.isfile(config_path):
    state = _read_safetensors(path)
    cfg = config_from_openclip(state, activation or "quick_gelu")
    return cfg, params_from_openclip(state, cfg)
  try:
    with open(config_path, encoding="utf-8") as f:
      cfg = config_from_openclip_json(json.load(f), config_path)
  except json.JSONDecodeError as e:
    raise UserError(f"{config_path!r} is not valid JSON: {e}") from e
  if activation is not None and _activation(activation, "openclip_activation") != cfg.activation:
    raise UserError(f"openclip_activation={activation!r} contradicts {config_path!r}, whose "
                    f"model is built with {cfg.activation}; leave openclip_activation unset.")
  state = _read_safetensors(path)
  try:
    return cfg, params_from_openclip(state, cfg)
  except UserError as e:
    raise UserError(f"{path!r} does not fit the architecture of {config_path!r}: {e}") from e


def save_hf(directory: str, cfg: model_lib.CLIPConfig, params: Mapping[str, Any],
            tokenizer_dir: str | None = None, template: str | None = None) -> None:
  """Writes a Hugging Face checkpoint directory that `transformers.CLIPModel.from_pretrained`
  and `CLIPTokenizer.from_pretrained` load: `config.json`, `model.safetensors` and tokenizer files;
  with `template`, also the prompt template the model was trained with (`PROMPT_FILE`, read by
  `recorded_template`).

  The tokenizer files are those `tokenizer.load_tokenizer(tokenizer_dir)` uses (the checkpoint's
  own, else CLIP's shipped vocabulary). Everything is written into a temporary sibling directory
  renamed into place at the end, so `directory` is never left half-written; it gets the mode the
  umask gives new directories. `directory` must not exist or be empty.
  """
  files.check_new_directory(directory, "save_hf")
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir, cfg.text.context_length)
  if tokenizer.vocab_size != cfg.text.vocab_size:
    raise UserError(f"save_hf: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                    f"vocabulary has {cfg.text.vocab_size}; pass tokenizer_dir= holding the "
                    "model's own tokenizer files.")
  state = params_to_hf(params, cfg)
  with files.atomic_directory(directory, "save_hf") as tmp:
    with open(os.path.join(tmp, HF_CONFIG), "w") as f:
      json.dump(config_to_hf(cfg), f, indent=2)
    if template is not None:
      with open(os.path.join(tmp, PROMPT_FILE), "w") as f:
        json.dump({"template": template}, f, indent=2)
    safetensors.numpy.save_file(state, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
    tokenizer.backend.model_max_length = cfg.text.context_length
    tokenizer.backend.save_pretrained(tmp)


def recorded_template(directory: str) -> str | None:
  """The prompt template `save_hf` recorded in a checkpoint directory; None if it records none."""
  path = os.path.join(directory, PROMPT_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)["template"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path!r} does not record a prompt template ({e}); remove it, or pass "
                    "--templates=config") from e
