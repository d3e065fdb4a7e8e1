"""MaPLe, Multi-modal Prompt Learning (Khattak et al., CVPR 2023): prompts in both towers, the
vision ones coupled to the text ones.

Text: n context tokens t (from the first n tokens of "a photo of a": "[t_1][t_2] of a
{class}."), and deep prompts P_j (n tokens each, N(0, 0.02)) that replace them at the input of
text blocks j = 1 .. J-1. Vision: the tokens proj(t) appended after the patch tokens, and
proj_j(P_j) replacing them at the input of vision blocks 1 .. J-1, each proj a Linear(text
width, vision width) (torch's default init; the J-1 deep ones start equal, as the official
clones). Logits 100 * cos(f, w_c) with both towers prompted; cross-entropy. The parameters:

    {'ctx': (n, Wt), 'deep': (J-1, n, Wt), 'proj': {'kernel': (Wt, Wv), 'bias': (Wv,)},
     'deep_proj': {'kernel': (J-1, Wt, Wv), 'bias': (J-1, Wv)}}

(3.55M for ViT-B/16 at J = 9, n = 2; no deep entries at J = 1). Both towers back-propagate
every step; the deep prompts are scanned with the block weights (`model.Prompts`). Recipe:
J = 9, n = 2, batch 4, 5 epochs, Dassl's SGD at lr 0.0035; cross-dataset and domain
generalization: J = 3, 2 epochs, lr 0.0026 (configs/maple.py). Layout, run and shared
departures: `prompt_learning`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from clip_lora_jax import base as base_lib
from clip_lora_jax import model
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import prompt_learning
from clip_lora_jax.methods.prompt_learning import Frozen
from clip_lora_jax.model import Params

SECTION = "maple"


@dataclasses.dataclass(frozen=True)
class Config(prompt_learning.PromptConfig):
  """n_ctx and init as `PromptConfig`; depth: J, the blocks of each tower that read learned
  prompts (1: the input only)."""
  section: ClassVar[str] = SECTION

  n_ctx: int = 2
  init: str = "a photo of a"
  depth: int = 9

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth <= 0:
      raise UserError(f"{SECTION}.depth={self.depth!r}: must be a positive integer")

  def check_model(self, model_config: model.CLIPConfig) -> None:
    super().check_model(model_config)
    layers = min(model_config.text.layers, model_config.vision.layers)
    if self.depth > layers:
      raise UserError(f"{SECTION}.depth={self.depth}: the base has {layers} blocks per tower; "
                      f"use a depth of at most {layers}")


def init(rng: jax.Array, base: base_lib.BaseModel, config: Config) -> Params:
  ctx_rng, deep_rng, proj_rng, deep_proj_rng = jax.random.split(rng, 4)
  text, vision = base.config.text.width, base.config.vision.width
  params = {"ctx": prompt_learning.init_context(ctx_rng, base, config),
            "proj": prompt_learning.torch_linear(proj_rng, text, vision)}
  deep = config.depth - 1
  if deep:
    params["deep"] = prompt_learning.INIT_STD * jax.random.normal(
        deep_rng, (deep, config.n_ctx, text), jnp.float32)
    one = prompt_learning.torch_linear(deep_proj_rng, text, vision)
    params["deep_proj"] = jax.tree.map(lambda x: jnp.stack([x] * deep), one)
  return params


def vision_prompts(params: Params) -> model.Prompts:
  """The vision tower's prompts, mapped from the text ones."""
  proj = params["proj"]
  tokens = params["ctx"] @ proj["kernel"] + proj["bias"]
  if "deep" not in params:
    return model.Prompts(tokens)
  deep_proj = params["deep_proj"]
  deep = (jnp.einsum("jnt,jtv->jnv", params["deep"], deep_proj["kernel"])
          + deep_proj["bias"][:, None])
  return model.Prompts(tokens, deep)


def text_features(params: Params, frozen: Frozen, config: Config) -> jax.Array:
  """(C, E) unit class embeddings of the prompted text tower."""
  del config
  return prompt_learning.encode_classes(frozen, model.Prompts(params["ctx"], params.get("deep")))


def logits(params: Params, frozen: Frozen, images: jax.Array, config: Config,
           text: jax.Array) -> jax.Array:
  del config
  image = prompt_learning.encode_images(frozen, images, vision_prompts(params))
  return frozen.scale * image @ text.T


train_and_evaluate = prompt_learning.run
load_adapter = prompt_learning.load_adapter
logits_fn = prompt_learning.logits_fn
