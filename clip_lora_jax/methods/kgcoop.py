"""KgCoOp, Knowledge-guided Context Optimization (Yao et al., CVPR 2023): CoOp whose class
embeddings are kept near the hand-crafted prompts' (w^clip_c, frozen, the dataset's template):

    loss = CE(100 * normalise(f) @ w^T) + lambda * (1 - mean_c cos(w_c, w^clip_c)),   lambda = 8

The parameters are CoOp's {'ctx': (M, text width)}: 4 vectors from "a photo of a". Departure:
the official DTD template is "a photo of a {}, a type of texture." where this uses the CoOp
protocol's ("{} texture."; `config.templates` chooses). Layout, run and shared departures:
`prompt_learning`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import coop, prompt_learning
from clip_lora_jax.methods.prompt_learning import Frozen
from clip_lora_jax.model import Params

SECTION = "kgcoop"
ZERO_SHOT = True


@dataclasses.dataclass(frozen=True)
class Config(prompt_learning.PromptConfig):
  """n_ctx and init as `PromptConfig`; lam: the weight of the knowledge-guidance term (>= 0)."""
  section: ClassVar[str] = SECTION

  n_ctx: int = 4
  init: str = "a photo of a"
  lam: float = 8.0

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) \
        or not math.isfinite(self.lam) or self.lam < 0:
      raise UserError(f"{SECTION}.lam={self.lam!r}: must be a finite number >= 0")


def guidance(text: jax.Array, zero_shot: jax.Array) -> jax.Array:
  """1 - mean_c cos(w_c, w^clip_c) of (C, E) unit embeddings."""
  return 1.0 - jnp.mean(jnp.sum(text * zero_shot, axis=-1))


def loss(params: Params, frozen: Frozen, images: jax.Array, labels: jax.Array,
         config: Config) -> tuple[jax.Array, jax.Array]:
  text = coop.text_features(params, frozen, config)
  scores = coop.logits(params, frozen, images, config, text)
  return (prompt_learning.cross_entropy(scores, labels)
          + config.lam * guidance(text, frozen.zero_shot), scores)


init = coop.init
text_features = coop.text_features
logits = coop.logits
train_and_evaluate = prompt_learning.run
load_adapter = prompt_learning.load_adapter
logits_fn = prompt_learning.logits_fn
