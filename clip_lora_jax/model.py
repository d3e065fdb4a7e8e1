"""CLIP in Flax: the two towers as linen modules and pure functions over parameter pytrees.

The layout follows OpenAI's CLIP (and `transformers.CLIPModel`, which is numerically the same):

* vision: conv patch embedding (no bias), class token, learned positions, `ln_pre`, pre-norm
  residual blocks, `ln_post` on the class token, linear projection without bias;
* text: token and position embeddings, causal pre-norm blocks, `ln_final`, pooled at the
  end-of-text token (OpenAI's rule: the position of the largest token id, since the end token
  49407 is the largest id of the vocabulary), linear projection without bias.

Every attention projection (`q`, `k`, `v`, `o`) is a `Dense` that also reads an optional
low-rank pair `{'a': (in, r), 'b': (r, out)}` from the `'lora'` variable collection at the same
path as its parameters. The low-rank branch is computed as `((dropout(x) @ a) @ b) * scale`,
never as a dense `a @ b` update, so training backpropagates through two thin matrices only.
The base parameters and the low-rank pairs are two separate pytrees: see `clip_lora_jax.lora`.

Parameters keep the per-layer layout of the checkpoints (`layers_0`, `layers_1`, ...), but the
blocks of a tower run as a `lax.scan` over their stacked weights: a tower compiles as one block
instead of one per layer (on an H200, the bf16 ViT-B/16 train step compiled in 31 s; unrolled,
it had not compiled after 115 s). The text tower also reads packed prompts: several prompts per row, each attending only to
itself (`clip_lora_jax.prompts`), so many prompts of mixed lengths cost their total length.

Both towers also take learned prompt tokens (`Prompts`, for the prompt-learning methods of
`clip_lora_jax.methods.prompt_learning`): in the text tower they replace the n token
embeddings after each prompt's start token (CoOp's "X X ... X {class}." layout), in the vision
tower they are appended after the patch tokens; deep prompts (MaPLe) replace those n tokens
again at the input of blocks 1 .. J-1, carried through the same scan as the block weights.
Without prompts, the towers run exactly the programs they ran before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from clip_lora_jax.dropout import dropped_down_projection, sum_input_chunks
from clip_lora_jax.errors import UserError

Params = Mapping[str, Any]
LORA_COLLECTION = "lora"
# CLIP's pixel normalisation (per RGB channel, of values in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Shape of the vision tower (a ViT)."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  image_size: int
  patch_size: int

  @property
  def num_positions(self) -> int:
    """Patches plus the class token."""
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Shape of the text tower (a causal transformer)."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  vocab_size: int = 49408
  context_length: int = 77


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP architecture. `name` identifies the base model (used to match adapters to bases)."""
  embed_dim: int
  vision: VisionConfig
  text: TextConfig
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  name: str = ""

  def tower(self, tower: str) -> VisionConfig | TextConfig:
    """The config of tower `'vision'` or `'text'`."""
    return {"vision": self.vision, "text": self.text}[tower]


def config_from_dict(d: Mapping[str, Any]) -> CLIPConfig:
  """The inverse of `dataclasses.asdict(config)` (used by files that store a config as JSON)."""
  try:
    config = CLIPConfig(**{**d, "vision": VisionConfig(**d["vision"]),
                           "text": TextConfig(**d["text"])})
  except (KeyError, TypeError) as e:
    raise UserError(f"not a valid CLIP architecture description: {e}") from e
  check_sizes(config, "the architecture description")
  return config


# Bounds of a sane architecture read from a file, checked before anything is traced or allocated
# for it: the largest public CLIP (ViT-bigG/14) has 48 layers and 2.5e9 parameters.
MAX_LAYERS = 256
MAX_PARAMETERS = 2 * 10**10


def check_sizes(config: CLIPConfig, where: str) -> None:
  """Raises a UserError naming the first size of `config` (read from `where`) that is not a
  positive integer, a width that the heads do not divide, a patch larger than the image, more
  than MAX_LAYERS layers or more than MAX_PARAMETERS parameters in all."""
  towers = {"vision": config.vision, "text": config.text}
  fields = {"vision": ("width", "layers", "heads", "mlp_dim", "image_size", "patch_size"),
            "text": ("width", "layers", "heads", "mlp_dim", "vocab_size", "context_length")}
  sizes = {"embed_dim": config.embed_dim,
           **{f"{name}.{field}": getattr(towers[name], field)
              for name in towers for field in fields[name]}}
  for key, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise UserError(f"{where}: {key}={value!r} must be a positive integer")
  for name, tower in towers.items():
    if tower.layers > MAX_LAYERS:
      raise UserError(f"{where}: {name}.layers={tower.layers} is more than any CLIP has (at most "
                      f"{MAX_LAYERS} are accepted)")
    if tower.width % tower.heads:
      raise UserError(f"{where}: {name}.width={tower.width} is not a multiple of "
                      f"{name}.heads={tower.heads}")
  if config.vision.patch_size > config.vision.image_size:
    raise UserError(f"{where}: vision.patch_size={config.vision.patch_size} is larger than "
                    f"vision.image_size={config.vision.image_size}")
  blocks = sum(t.layers * (4 * t.width * (t.width + 1) + 2 * t.width * t.mlp_dim)
               for t in towers.values())
  embeddings = (config.vision.num_positions * config.vision.width
                + 3 * config.vision.patch_size ** 2 * config.vision.width
                + (config.text.vocab_size + config.text.context_length) * config.text.width
                + (config.vision.width + config.text.width) * config.embed_dim)
  if blocks + embeddings > MAX_PARAMETERS:
    raise UserError(f"{where}: the architecture has about {blocks + embeddings:.2e} parameters, "
                    f"more than any CLIP (at most {MAX_PARAMETERS:.0e} are accepted)")


def _openai_config(name: str, embed_dim: int, vision: VisionConfig, text_width: int,
                   text_heads: int) -> CLIPConfig:
  text = TextConfig(width=text_width, layers=12, heads=text_heads, mlp_dim=4 * text_width)
  return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, name=name)


ARCHITECTURES: dict[str, CLIPConfig] = {
    "ViT-B/32": _openai_config("ViT-B/32", 512, VisionConfig(768, 12, 12, 3072, 224, 32), 512, 8),
    "ViT-B/16": _openai_config("ViT-B/16", 512, VisionConfig(768, 12, 12, 3072, 224, 16), 512, 8),
    "ViT-L/14": _openai_config("ViT-L/14", 768, VisionConfig(1024, 24, 16, 4096, 224, 14), 768,
                               12),
    "ViT-L/14-336": _openai_config("ViT-L/14-336", 768, VisionConfig(1024, 24, 16, 4096, 336, 14),
                                   768, 12),
    # Random-weight test models: the real vocabulary, so the real tokenizer drives them.
    "tiny": CLIPConfig(embed_dim=32, vision=VisionConfig(64, 2, 4, 128, 32, 8),
                       text=TextConfig(48, 2, 4, 96), name="tiny"),
    "tiny-12": CLIPConfig(embed_dim=32, vision=VisionConfig(64, 12, 4, 128, 32, 16),
                          text=TextConfig(48, 12, 4, 96), name="tiny-12"),
}


def get_config(name: str) -> CLIPConfig:
  """A named architecture (`ViT-B/32`, `ViT-B/16`, `ViT-L/14`, `ViT-L/14-336`, `tiny`, `tiny-12`)."""
  if name not in ARCHITECTURES:
    raise UserError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
  return ARCHITECTURES[name]


@jax.custom_vjp
def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x). Its backward saves x only."""
  return x * jax.nn.sigmoid(1.702 * x)


def _quick_gelu_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return quick_gelu(x), x


def _quick_gelu_backward(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  s = jax.nn.sigmoid(1.702 * x)
  return (g * (s + 1.702 * x * s * (1 - s)),)


quick_gelu.defvjp(_quick_gelu_forward, _quick_gelu_backward)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


# `jax.nn.dot_product_attention` implementations. cuDNN's fused kernel needs a GPU, bf16 / fp16
# and, to train, even sequence lengths: on jax 0.11.2 it refused ViT-B/16's 197 positions
# ("Unsupported sequence length Q 197, KV 197", benchmarks/gpu.py on an H200), so XLA's is the
# default; cuDNN's serves where it applies (ViT-B/32's 50 positions, inference).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How the towers run (not what they are): low-rank scale and dropout, compute dtype, remat,
  and the attention kernel of the unmasked and plainly causal attention (see
  ATTENTION_IMPLEMENTATIONS)."""
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "xla"

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise UserError(f"attention={self.attention!r}: use one of "
                      f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")


class Dense(nn.Module):
  """`x @ kernel + bias`, plus `((dropout(x) @ a) @ b) * lora_scale` when a low-rank pair exists.

  The pair lives in the `'lora'` collection under this module's path, so base parameters and
  adapters stay separate pytrees and gradients can be taken with respect to the adapter alone.
  An `a` with fewer rows than the input width is shared by equal input chunks (see
  `sum_input_chunks`). Per-example pairs, `a` (B, in, r) and `b` (B, r, out) with B the leading
  axis of `x`, give each example its own branch (`clip_lora_jax.multi_adapter`: one batch of
  many adapters' examples; inference only, no dropout).
  """
  features: int
  use_bias: bool = True
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    dtype = self.runtime.dtype
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
    if self.has_variable(LORA_COLLECTION, "a"):
      a = self.get_variable(LORA_COLLECTION, "a")
      b = self.get_variable(LORA_COLLECTION, "b")
      x, a, rate = x.astype(dtype), a.astype(dtype), self.runtime.lora_dropout
      if a.ndim == 3:
        if not deterministic and rate > 0:
          raise ValueError("per-example low-rank pairs serve inference: no dropout")
        down = jnp.einsum("b...i,bir->b...r", x, a)
        return y + jnp.einsum("b...r,bro->b...o", down, b.astype(dtype)) * self.runtime.lora_scale
      if deterministic or rate == 0:
        down = jnp.dot(sum_input_chunks(x, a.shape[0]), a)
      else:
        down = dropped_down_projection(x, a, self.make_rng("dropout"), rate)
      y = y + jnp.dot(down, b.astype(dtype)) * self.runtime.lora_scale
    return y


@flax.struct.dataclass
class Prompts:
  """Learned prompt tokens of one tower (a pytree: an argument of the jitted encoders).

  tokens: (n, W). Text tower: they replace the token embeddings at positions 1 .. n of every
    prompt (right after the start token; the class name and the end token follow), before the
    position embeddings are added. Vision tower: appended after the patch tokens, after the
    position embeddings and before `ln_pre` (MaPLe's layout; the class token still pools).
  deep: (J-1, n, W) or None: the tokens that replace those n positions at the input of blocks
    1 .. J-1 (MaPLe's deep prompts, J <= layers); the blocks from J on read what the previous
    block wrote there.
  """
  tokens: jax.Array
  deep: jax.Array | None = None

  @property
  def count(self) -> int:
    return self.tokens.shape[-2]


# Writes one layer's (n, W) prompt tokens into (B, T, W) states where `on` (a 0-d bool) holds.
PromptWriter = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _layer_prompts(deep: jax.Array, layers: int) -> tuple[jax.Array, jax.Array]:
  """(J-1, n, W) deep prompts -> (layers, n, W) prompts and (layers,) flags, layer i's input
  replaced iff its flag (1 <= i < J): one scan body serves prompted and plain layers."""
  depth = deep.shape[0] + 1
  if depth > layers:
    raise ValueError(f"{deep.shape[0]} deep prompt layers for a tower of {layers} blocks: at "
                     f"most {layers - 1}")
  padded = jnp.zeros((layers, *deep.shape[1:]), deep.dtype).at[1:depth].set(deep)
  index = jnp.arange(layers)
  return padded, (index >= 1) & (index < depth)


# (rows, columns) of the positions a tower pools, each (Q,); rows None: row q of the batch.
Pool = tuple[jax.Array | None, jax.Array]


def _take(x: jax.Array, pool: Pool) -> jax.Array:
  """(B, T, ...) -> (Q, ...): the entries at the positions `pool`."""
  rows, cols = pool
  if rows is None:
    return jnp.take_along_axis(x, cols.reshape(-1, *[1] * (x.ndim - 1)), axis=1)[:, 0]
  return x[rows, cols]


def _pooled_attention(q: jax.Array, k: jax.Array, v: jax.Array, first: jax.Array | None,
                      last: jax.Array | None) -> jax.Array:
  """Softmax attention of one query per sequence: q (Q, H, D), k and v (Q, S, H, D) -> (Q, H, D);
  query q attends to positions [first[q], last[q]] (None: from the first, to the last).

  Products and sums instead of dots: XLA's CPU backend cannot compile the bf16 batched
  matrix-vector dots of this shape, and they are a negligible share of the step.
  """
  f32 = jnp.float32
  scores = jnp.sum(q[:, None].astype(f32) * k.astype(f32), axis=-1) / np.sqrt(q.shape[-1])
  positions = jnp.arange(k.shape[1])[None, :, None]
  if last is not None:
    scores = jnp.where(positions <= last[:, None, None], scores, -jnp.inf)
  if first is not None:
    scores = jnp.where(positions >= first[:, None, None], scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=1)
  return jnp.sum(weights[..., None] * v.astype(f32), axis=1).astype(q.dtype)


def _segment_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                              starts: jax.Array) -> jax.Array:
  """Causal attention within packed segments: position i of row b attends to [starts[b, i], i]."""
  positions = jnp.arange(q.shape[1])
  mask = ((positions[None, None, :] <= positions[None, :, None])
          & (positions[None, None, :] >= starts[:, :, None]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


class Attention(nn.Module):
  """Multi-head self-attention with separate q, k, v, o projections (all with bias).

  Causal: position i attends to positions [starts[b, i], i] (`starts` (B, T): the first
  position of i's packed prompt; None: 0). Otherwise to every position. With `pool`, only those
  queries are computed (they still attend as above): output (Q, D) instead of (B, T, D).
  """
  heads: int
  causal: bool
  runtime: Runtime

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True, starts: jax.Array | None = None,
               pool: Pool | None = None) -> jax.Array:
    width = x.shape[-1]
    head_dim = width // self.heads
    project = lambda name, t: Dense(width, runtime=self.runtime, name=name)(t, deterministic)
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, head_dim)
    k, v = (split(project(name, x)) for name in ("k", "v"))
    if pool is None:
      q = split(project("q", x))
      if starts is None:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                           implementation=self.runtime.attention)
      else:
        out = _segment_causal_attention(q, k, v, starts)
      return project("o", out.reshape(x.shape))
    rows, cols = pool
    q = split(project("q", _take(x, pool)))
    if rows is not None:
      k, v = k[rows], v[rows]
    first = None if starts is None or not self.causal else _take(starts, pool)
    out = _pooled_attention(q, k, v, first, cols if self.causal else None)
    return project("o", out.reshape(-1, width))


class ResidualBlock(nn.Module):
  """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  With `pool`, only those positions come out: (Q, D).
  """
  heads: int
  mlp_dim: int
  causal: bool
  runtime: Runtime

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True, starts: jax.Array | None = None,
               pool: Pool | None = None) -> jax.Array:
    rt = self.runtime
    norm = lambda name: nn.LayerNorm(rt.layer_norm_eps, dtype=rt.dtype, name=name)
    attn = Attention(self.heads, self.causal, rt, name="attn")(norm("ln_1")(x), deterministic,
                                                              starts, pool)
    x = (x if pool is None else _take(x, pool)) + attn
    return x + Mlp(self.mlp_dim, rt, name="mlp")(norm("ln_2")(x))


class Mlp(nn.Module):
  """fc2(activation(fc1(x)))."""
  hidden: int
  runtime: Runtime

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Dense(self.hidden, runtime=self.runtime, name="fc1")(x)
    return Dense(x.shape[-1], runtime=self.runtime, name="fc2")(ACTIVATIONS[self.runtime.activation](h))


def _stack(trees: list[Any]) -> Any:
  """Pytrees of one structure -> one pytree of arrays with a new leading axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _scan_segments(adapters: Mapping[str, Any], count: int) -> list[list[int]]:
  """Runs of consecutive layers among the first `count` whose adapters (or absence of one) have
  the same shapes: each run is one scan over stacked weights."""
  signature = lambda i: jax.tree.map(np.shape, adapters.get(f"layers_{i}"))
  runs: list[list[int]] = []
  for i in range(count):
    if runs and signature(runs[-1][-1]) == signature(i):
      runs[-1].append(i)
    else:
      runs.append([i])
  return runs


def _run_blocks(tower: nn.Module, x: jax.Array, config: VisionConfig | TextConfig,
                causal: bool, deterministic: bool, starts: jax.Array | None,
                pool: Pool, deep: jax.Array | None = None,
                write: PromptWriter | None = None) -> jax.Array:
  """The residual blocks `layers_0 .. layers_{L-1}` of `tower` (a module whose parameters hold
  them in that per-layer layout); (Q, D) states at the positions `pool` that the tower pools.

  Blocks 0 .. L-2 run as scans over their stacked weights (one per run of layers with the same
  adapter shapes: `_scan_segments`), so a tower compiles as one block. The last block computes
  only the pooled positions (its keys and values still read every position): the other
  positions of its output are unused. Block i's dropout key is `fold_in(tower key, i)`.
  With `deep` prompts ((J-1, n, W), see `Prompts`), `write` puts layer i's into its input for
  1 <= i < J; the per-layer prompts are scanned with the weights.
  """
  rt = tower.runtime
  make_block = functools.partial(ResidualBlock, config.heads, config.mlp_dim, causal, rt)
  last = config.layers - 1
  if tower.is_initializing():  # Declares every block's parameters, in the per-layer layout.
    for i in range(last):
      x = make_block(name=f"layers_{i}")(x)
    return make_block(name=f"layers_{last}")(x, pool=pool)
  params = tower.variables["params"]
  adapters = tower.variables.get(LORA_COLLECTION, {})
  tower_key = None if deterministic else tower.make_rng("dropout")
  block = make_block(parent=None)
  layer_prompts = None if deep is None else _layer_prompts(deep.astype(rt.dtype), config.layers)

  def apply(block_params, block_adapter, layer, prompt, x, pool=None):
    if prompt is not None:
      x = write(x, *prompt)
    variables = {"params": block_params}
    if block_adapter is not None:
      variables[LORA_COLLECTION] = block_adapter
    rngs = {} if tower_key is None else {"dropout": jax.random.fold_in(tower_key, layer)}
    return block.apply(variables, x, deterministic, starts, pool, rngs=rngs)

  def scan_body(x, layer_inputs):
    return apply(*layer_inputs, x), None

  if rt.remat:
    scan_body = jax.checkpoint(scan_body)
  for layers in _scan_segments(adapters, last):
    stacked = (_stack([params[f"layers_{i}"] for i in layers]),
               _stack([adapters[f"layers_{i}"] for i in layers])
               if f"layers_{layers[0]}" in adapters else None,
               jnp.asarray(layers, jnp.uint32),
               None if layer_prompts is None else
               jax.tree.map(lambda a: a[layers[0]:layers[-1] + 1], layer_prompts))
    x, _ = jax.lax.scan(scan_body, x, stacked)
  prompt = None if layer_prompts is None else jax.tree.map(lambda a: a[last], layer_prompts)
  return apply(params[f"layers_{last}"], adapters.get(f"layers_{last}"), last, prompt, x, pool)


class VisionTower(nn.Module):
  """Patch embedding, class token, positions, ln_pre, blocks, ln_post on the class token; with
  `prompts`, their tokens appended after the patch tokens (see `Prompts`)."""
  config: VisionConfig
  runtime: Runtime

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True,
               prompts: Prompts | None = None) -> jax.Array:
    cfg, rt = self.config, self.runtime
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"images of shape {images.shape[1:]} given to a vision tower that takes "
                       f"({cfg.image_size}, {cfg.image_size}, 3)")
    if images.dtype == jnp.uint8:
      images = normalize_pixels(images)
    p = cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=rt.dtype, name="patch_embedding")(images.astype(rt.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.width,))
    pos = self.param("position_embedding", nn.initializers.normal(0.01),
                     (cfg.num_positions, cfg.width))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    deep = write = None
    if prompts is not None:
      n = prompts.count
      tokens = lambda p: jnp.broadcast_to(p.astype(x.dtype), (x.shape[0], n, cfg.width))
      x = jnp.concatenate([x, tokens(prompts.tokens)], axis=1)
      deep = prompts.deep
      write = lambda x, p, on: jnp.concatenate(
          [x[:, :-n], jnp.where(on, tokens(p), x[:, -n:])], axis=1)
    x = nn.LayerNorm(rt.layer_norm_eps, dtype=rt.dtype, name="ln_pre")(x)
    x = _run_blocks(self, x, cfg, causal=False, deterministic=deterministic, starts=None,
                    pool=(None, jnp.zeros(x.shape[0], jnp.int32)), deep=deep, write=write)
    return nn.LayerNorm(rt.layer_norm_eps, dtype=rt.dtype, name="ln_post")(x)


class TextTower(nn.Module):
  """Token and position embeddings, causal blocks, ln_final, pooled at the end-of-text token.

  Plain input: (N, T) ids, one prompt per row, T <= context_length; the encoder is causal and
  pools at the end token, so ids cut after the longest prompt's end token give exactly the same
  output as the full 77. Packed input (`positions` and `ends` given, see
  `clip_lora_jax.prompts.pack_prompts`): rows of several prompts; token j of a row sits at
  position `positions[j]` of its own prompt and attends to that prompt only; prompt q ends at
  row `ends[0][q]`, column `ends[1][q]`. Output (Q, width), one row per pooled prompt. With
  `prompts`, their tokens replace positions 1 .. n of every prompt (see `Prompts`): the ids
  there are placeholders, and the end token must come after them.
  """
  config: TextConfig
  runtime: Runtime

  @nn.compact
  def __call__(self, token_ids: jax.Array, deterministic: bool = True,
               positions: jax.Array | None = None, ends: Pool | None = None,
               prompts: Prompts | None = None) -> jax.Array:
    cfg, rt = self.config, self.runtime
    length = token_ids.shape[-1]
    if positions is None and length > cfg.context_length:
      raise ValueError(f"token ids of length {length} exceed the context {cfg.context_length}")
    x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(token_ids).astype(rt.dtype)
    pos = self.param("position_embedding", nn.initializers.normal(0.01),
                     (cfg.context_length, cfg.width))
    deep = write = None
    if prompts is not None:
      slots = (jnp.arange(length) if positions is None else positions) - 1
      inside = ((slots >= 0) & (slots < prompts.count))[..., None]
      slots = jnp.clip(slots, 0, prompts.count - 1)
      write = lambda x, p, on: jnp.where(inside & on, p.astype(x.dtype)[slots], x)
      x = write(x, prompts.tokens, True)
      deep = prompts.deep
    if positions is None:
      x = x + pos[:length].astype(rt.dtype)
      starts, ends = None, (None, jnp.argmax(token_ids, axis=-1))
    else:
      x = x + pos[positions].astype(rt.dtype)
      starts = jnp.arange(length)[None, :] - positions
    x = _run_blocks(self, x, cfg, causal=True, deterministic=deterministic, starts=starts,
                    pool=ends, deep=deep, write=write)
    return nn.LayerNorm(rt.layer_norm_eps, dtype=rt.dtype, name="ln_final")(x)


class CLIP(nn.Module):
  """Both towers. Top-level parameters: `vision`, `text`, `visual_projection`,
  `text_projection`, and `logit_scale` (the log of the scale, 0-d, as in OpenAI's weights)."""
  config: CLIPConfig
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "xla"

  def setup(self):
    cfg = self.config
    rt = Runtime(cfg.activation, cfg.layer_norm_eps, self.lora_scale, self.lora_dropout,
                 self.dtype, self.remat, self.attention)
    self.vision = VisionTower(cfg.vision, rt)
    self.text = TextTower(cfg.text, rt)
    self.visual_projection = Dense(cfg.embed_dim, use_bias=False, runtime=rt)
    self.text_projection = Dense(cfg.embed_dim, use_bias=False, runtime=rt)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

  def encode_image(self, images: jax.Array, deterministic: bool = True,
                   prompts: Prompts | None = None) -> jax.Array:
    """(B, H, W, 3) CLIP-normalised images, or uint8 pixels (normalised here) -> (B, embed_dim)
    unnormalised float32 embeddings."""
    return self.visual_projection(self.vision(images, deterministic, prompts)
                                  ).astype(jnp.float32)

  def encode_image_features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images -> (B, vision width) float32 pooled features before the projection
    (what `encode_image` projects; methods that train the projection start from them)."""
    return self.vision(images, True).astype(jnp.float32)

  def encode_text(self, token_ids: jax.Array, deterministic: bool = True,
                  positions: jax.Array | None = None, ends: Pool | None = None,
                  prompts: Prompts | None = None) -> jax.Array:
    """(N, T) token ids, T <= context_length (or packed prompts: see `TextTower`) ->
    (prompts, embed_dim) unnormalised float32 embeddings."""
    return self.text_projection(self.text(token_ids, deterministic, positions, ends, prompts)
                                ).astype(jnp.float32)

  def __call__(self, images: jax.Array, token_ids: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """Image-text logits exp(logit_scale) * cos(image, text), shape (B, N)."""
    return cosine_logits(self.encode_image(images, deterministic),
                         self.encode_text(token_ids, deterministic), jnp.exp(self.logit_scale))


def normalize_pixels(pixels: jax.Array) -> jax.Array:
  """uint8 RGB pixels -> CLIP-normalised float32 (on the device: a quarter of the bytes to
  send, and no float work on the host)."""
  return ((pixels.astype(jnp.float32) / 255.0 - jnp.asarray(CLIP_MEAN, jnp.float32))
          / jnp.asarray(CLIP_STD, jnp.float32))


def normalize(x: jax.Array) -> jax.Array:
  """L2-normalises the last axis."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def cosine_logits(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array | float) -> jax.Array:
  """scale * cos(image_i, text_j) for every pair: shape (B, N)."""
  return scale * normalize(image_emb) @ normalize(text_emb).T


def param_shapes(config: CLIPConfig) -> Params:
  """The parameter pytree of `config` as `jax.ShapeDtypeStruct`s (traced, nothing computed)."""
  images = jax.ShapeDtypeStruct((1, config.vision.image_size, config.vision.image_size, 3),
                                jnp.float32)
  token_ids = jax.ShapeDtypeStruct((1, config.text.context_length), jnp.int32)
  return jax.eval_shape(CLIP(config).init, jax.random.key(0), images, token_ids)["params"]


def _random_leaf(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """A leaf of `init_params` by its name, as the modules' initializers draw it."""
  normal = lambda std: (rng.standard_normal(shape, np.float32) * np.float32(std))
  if name == "kernel":  # lecun normal: variance 1 / fan_in.
    return normal(1 / math.sqrt(math.prod(shape[:-1])))
  if name in ("embedding", "class_embedding"):
    return normal(0.02)
  if name == "position_embedding":
    return normal(0.01)
  if name == "logit_scale":
    return np.full(shape, math.log(1 / 0.07), np.float32)
  return (np.ones if name == "scale" else np.zeros)(shape, np.float32)  # LayerNorm / biases.


def init_params(rng: jax.Array, config: CLIPConfig) -> Params:
  """Random base parameters for `config` (for tests and benchmarks; real runs load weights).

  The shapes are traced (`param_shapes`), the values drawn with numpy on the host from the
  modules' initializer distributions, seeded by `rng`: nothing is compiled. (Flax's jitted init
  of ViT-B/16 compiled for 73 to 79 s on a GPU: one kernel per parameter.)"""
  key = rng if jnp.issubdtype(rng.dtype, jnp.uint32) else jax.random.key_data(rng)
  generator = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
  leaves = jax.tree.map_with_path(
      lambda path, leaf: _random_leaf(path[-1].key, leaf.shape, generator), param_shapes(config))
  return jax.device_put(leaves)


def trim_token_ids(token_ids: jax.Array | np.ndarray, multiple: int = 8) -> jax.Array | np.ndarray:
  """Token ids cut to the shortest context covering every row's end token, rounded up to a
  multiple of `multiple` (few distinct lengths, few recompilations).

  Exact: the text tower is causal and pools at the end token, so later positions cannot change
  any output; the cost of the text tower drops from 77 positions to typically 8 or 16.
  """
  full = token_ids.shape[-1]
  longest = int(np.max(np.argmax(np.asarray(token_ids), axis=-1))) + 1 if len(token_ids) else 1
  return token_ids[:, :min(full, -(-longest // multiple) * multiple)]


def _variables(params: Params, lora: Params | None) -> dict:
  return {"params": params} if lora is None else {"params": params, LORA_COLLECTION: lora}


# The public encoders are jitted (inlined when called inside another jitted function): called
# from Python, they run as one compiled program instead of one dispatch per operation.
_ENCODER_OPTIONS = ("config", "lora_scale", "lora_dropout", "dtype", "remat", "attention")


@functools.partial(jax.jit, static_argnames=_ENCODER_OPTIONS)
def encode_images(params: Params, images: jax.Array, config: CLIPConfig, *,
                  lora: Params | None = None, lora_scale: float = 1.0, lora_dropout: float = 0.0,
                  dropout_rng: jax.Array | None = None, dtype: Any = jnp.float32,
                  remat: bool = False, attention: str = "xla",
                  prompts: Prompts | None = None) -> jax.Array:
  """Image embeddings (unnormalised). Dropout on the low-rank branch runs iff `dropout_rng`;
  `prompts`: learned vision prompt tokens (see `Prompts`)."""
  model = CLIP(config, lora_scale, lora_dropout, dtype, remat, attention)
  rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
  return model.apply(_variables(params, lora), images, dropout_rng is None, prompts,
                     method=CLIP.encode_image, rngs=rngs)


@functools.partial(jax.jit, static_argnames=("config",))
def encode_image_features(params: Params, images: jax.Array, config: CLIPConfig) -> jax.Array:
  """Pooled image features before the visual projection, (B, vision width): `encode_images`
  is `project_images(encode_image_features(...))`."""
  return CLIP(config).apply({"params": params}, images, method=CLIP.encode_image_features)


def project_images(params: Params, features: jax.Array) -> jax.Array:
  """Pooled image features -> unnormalised image embeddings (the visual projection)."""
  return jnp.matmul(features, params["visual_projection"]["kernel"].astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=(*_ENCODER_OPTIONS, "chunk_size"))
def encode_texts(params: Params, token_ids: jax.Array, config: CLIPConfig, *,
                 lora: Params | None = None, lora_scale: float = 1.0, lora_dropout: float = 0.0,
                 dropout_rng: jax.Array | None = None, dtype: Any = jnp.float32,
                 remat: bool = False, attention: str = "xla", chunk_size: int | None = None,
                 positions: jax.Array | None = None, ends: Pool | None = None,
                 prompts: Prompts | None = None) -> jax.Array:
  """Text embeddings (unnormalised) of (N, T) token ids, or of packed prompts (`positions` and
  `ends`: see `TextTower` and `clip_lora_jax.prompts.encode_packed`); `prompts`: learned prompt
  tokens written over positions 1 .. n of every prompt (see `Prompts`).

  With `chunk_size`, the N prompts run through the tower `chunk_size` at a time inside one
  compiled loop (`lax.map`), so tens of thousands of prompts fit in memory in one call.
  """
  model = CLIP(config, lora_scale, lora_dropout, dtype, remat, attention)
  rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
  encode = lambda ids, positions=None, ends=None: model.apply(
      _variables(params, lora), ids, dropout_rng is None, positions, ends, prompts,
      method=CLIP.encode_text, rngs=rngs)
  n = token_ids.shape[0]
  if positions is not None or chunk_size is None or n <= chunk_size:
    return encode(token_ids, positions, ends)
  padded = -(-n // chunk_size) * chunk_size
  ids = jnp.pad(token_ids, ((0, padded - n), (0, 0)))
  chunks = ids.reshape(padded // chunk_size, chunk_size, ids.shape[-1])
  return jax.lax.map(encode, chunks).reshape(padded, -1)[:n]


@functools.partial(jax.jit, static_argnames=("config", "lora_scale"))
def logits(params: Params, images: jax.Array, token_ids: jax.Array, config: CLIPConfig,
           lora: Params | None = None, lora_scale: float = 1.0) -> jax.Array:
  """exp(logit_scale) * cos(image, text) for every image-prompt pair, shape (B, N)."""
  model = CLIP(config, lora_scale)
  return model.apply(_variables(params, lora), images, token_ids)
