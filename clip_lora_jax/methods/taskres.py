"""TaskRes, Task Residual Tuning (Yu et al., "Task Residual for Tuning Vision-Language Models",
CVPR 2023), on frozen CLIP image embeddings.

The zero-shot text classifier t (C, E) stays fixed; a task residual x of the same shape,
initialised to zero, is learned and added to it with the scale alpha:

    t' = t + alpha * x,      logits = 100 * normalise(f) @ normalise(t')^T

trained with cross-entropy. As in the official `trainers/taskres.py`, t is the mean of the
templates' *unnormalised* text embeddings (one template per dataset; ImageNet's seven plus "a
photo of a {}.", `config.templates = "coop_ensemble"`): only t' is normalised, so the norm of t
sets how far a step of x turns the class embedding (this module's CLASSIFIER = "raw_mean" has the
run build t so). The parameters are one pytree

    {'residual': (C, E), 'frozen': {'base': (C, E)}}

Departures from the official code: the official per-shot scripts (lr 2e-3, ImageNet 2e-4; 100
epochs at 1-4 shots, 200 at 8-16; alpha 0.5, Flowers 1.0) are written for RN50, and its one
ViT-B/16 config (`adam_lr2e-4_B256_ep200_ViT16`: torch Adam, lr 2e-4, 200 epochs, batch 256,
Dassl's default weight decay 5e-4) matches their ImageNet line; configs/taskres.py uses the
scripts' values with that optimizer, but without the warm-up epoch at lr 1e-5 and with the
learning rate decayed every step, not every epoch. The base classifier is computed in float32
(the official in CLIP's float16). Training reads `config.views` cached augmented views of every
shot instead of a fresh augmentation each epoch. The "enhanced" base (t from a text projection
tuned beforehand) is not provided: it needs that separately trained projection.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, zero_shot
from clip_lora_jax.model import Params, normalize

SECTION = "taskres"
INPUT = "embedding"
CLASSIFIER = "raw_mean"


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """alpha: the scale of the residual, a finite number >= 0 (0 is zero-shot CLIP)."""
  alpha: float = 0.5

  def __post_init__(self):
    if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
            and math.isfinite(self.alpha) and self.alpha >= 0):
      raise UserError(f"{SECTION}.alpha={self.alpha!r}: must be a finite number >= 0")


def init(task: feature_cache.Task, config: Config) -> Params:
  del config
  return {"residual": jnp.zeros_like(jnp.asarray(task.classifier)),
          feature_cache.FROZEN: {"base": jnp.asarray(task.classifier)}}


def classifier(params: Params, config: Config) -> jax.Array:
  """t' = t + alpha * x, unnormalised, (C, E)."""
  return params[feature_cache.FROZEN]["base"] + config.alpha * params["residual"]


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  return zero_shot.SCALE * normalize(x) @ normalize(classifier(params, config)).T


loss = feature_cache.cross_entropy_loss(logits)


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
