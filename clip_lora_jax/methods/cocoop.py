"""CoCoOp, Conditional Context Optimization (Zhou et al., CVPR 2022): CoOp's context shifted for
each image by a small meta-network of the image's unit embedding f:

    t_m(f) = t_m + MetaNet(f),   MetaNet = Linear(E, E/16) - ReLU - Linear(E/16, text width)
    logits_c = 100 * cos(f, text([SOS] t_1(f) .. t_M(f) {class_c}. [EOS]))

trained with cross-entropy. Every image has its own class prompts: the official code runs the
text tower once per image over all classes. Here one compiled step encodes the classes for all
the batch's images at once (`jax.lax.map` over chunks of `images_per_pass` images, vmapped
within a chunk), with the same numbers. The parameters are one pytree

    {'ctx': (4, text width), 'meta_net': {'linear1': {'kernel', 'bias'}, 'linear2': ...}}

with the context from "a photo of a" and the meta-net drawn as torch's Linear default (512 ->
32 -> 512 for ViT-B/16: E is the embedding width, as the official `vis_dim`). Recipe: batch 1,
10 epochs, Dassl's SGD at lr 0.002 (configs/cocoop.py). Layout, run and shared departures:
`prompt_learning`.
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

SECTION = "cocoop"
HIDDEN_RATIO = 16  # The meta-net's hidden width is the embedding width / 16.


@dataclasses.dataclass(frozen=True)
class Config(prompt_learning.PromptConfig):
  """n_ctx and init as `PromptConfig`; images_per_pass: images whose class prompts go through
  the text tower together (memory: images_per_pass x classes prompts at once)."""
  section: ClassVar[str] = SECTION

  n_ctx: int = 4
  init: str = "a photo of a"
  images_per_pass: int = 8

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.images_per_pass, bool) or not isinstance(self.images_per_pass, int) \
        or self.images_per_pass <= 0:
      raise UserError(f"{SECTION}.images_per_pass={self.images_per_pass!r}: must be a positive "
                      "integer")


def init(rng: jax.Array, base: base_lib.BaseModel, config: Config) -> Params:
  ctx_rng, rng1, rng2 = jax.random.split(rng, 3)
  embed, hidden = base.config.embed_dim, max(1, base.config.embed_dim // HIDDEN_RATIO)
  return {"ctx": prompt_learning.init_context(ctx_rng, base, config),
          "meta_net": {"linear1": prompt_learning.torch_linear(rng1, embed, hidden),
                       "linear2": prompt_learning.torch_linear(rng2, hidden,
                                                               base.config.text.width)}}


def meta_net(params: Params, image: jax.Array) -> jax.Array:
  """(B, E) unit image embeddings -> (B, text width) context shifts."""
  layer = lambda p, x: x @ p["kernel"] + p["bias"]
  return layer(params["linear2"], jax.nn.relu(layer(params["linear1"], image)))


def text_features(params: Params, frozen: Frozen, config: Config) -> None:
  """Nothing: the class embeddings depend on the image (`logits`)."""
  del params, frozen, config


def logits(params: Params, frozen: Frozen, images: jax.Array, config: Config,
           text: None = None) -> jax.Array:
  del text
  image = prompt_learning.encode_images(frozen, images)
  contexts = params["ctx"][None] + meta_net(params["meta_net"], image)[:, None]
  classes = jax.lax.map(lambda ctx: prompt_learning.encode_classes(frozen, model.Prompts(ctx)),
                        contexts, batch_size=config.images_per_pass)
  return frozen.scale * jnp.einsum("be,bce->bc", image, classes)


train_and_evaluate = prompt_learning.run
load_adapter = prompt_learning.load_adapter
logits_fn = prompt_learning.logits_fn
