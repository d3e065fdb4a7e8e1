"""ProLIP (Fahes et al., "Fine-Tuning CLIP's Last Visual Projector: A Few-Shot Cornucopia",
arXiv 2410.05270), on frozen pooled image features.

The visual projection W (width x E), the last layer of CLIP's image tower, is fine-tuned on the
pooled features x that enter it, starting from the pretrained W0 and held near it by a penalty;
the zero-shot classifier T (unit, the dataset's template) scores the projected features:

    logits = 100 * normalise(x @ W) @ T^T,      loss = CE + lam * sum((W - W0)^2)

so at W = W0 the logits are zero-shot CLIP's. As in the official `methods/ProLIP.py` (ViT
branch: `x_before_proj @ vit_proj`, an `nn.MSELoss(reduction='sum')` against a copy of the
pretrained projection). The parameters are one pytree

    {'projection': (W, E), 'frozen': {'classifier': (C, E), 'initial': (W, E)}}

(the adapter file keeps W0 as well: the penalty needs it, inference does not).

The recipe (configs/prolip.py) is the official validation-free one, the setting of the
repository's ViT-B/16 configs (`DG_VITB16.yaml`, `base_to_new_VITB16.yaml`): lam = 1 / shots,
torch Adam with lr 1e-5, eps 1e-4 and no weight decay, cosine to 0 over 300 steps, each step the
whole few-shot set, features of 300 augmented views. Departures: a step's batch is shots x
classes rows drawn without replacement from all the cached views (the official code takes view
k of every shot at step k); for ImageNet the classifier averages CoOp's 7 templates and "a photo
of a {}." (the official: the 7 alone). The official few-shot-validation setting (a grid search of
lr in 1e-2 ... 1e-8 and lam in 10 ... 0, 49 trainings scored on the validation shots) is not
provided.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, zero_shot
from clip_lora_jax.model import Params, normalize

SECTION = "prolip"
INPUT = "features"


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """regularization: lam, the weight of sum((W - W0)^2) in the loss, a finite number >= 0 (the
  official validation-free recipe: 1 / shots)."""
  regularization: float = 1.0

  def __post_init__(self):
    value = self.regularization
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0):
      raise UserError(f"{SECTION}.regularization={value!r}: must be a finite number >= 0")


def init(task: feature_cache.Task, config: Config) -> Params:
  del config
  return {"projection": jnp.asarray(task.projection),
          feature_cache.FROZEN: {"classifier": jnp.asarray(task.classifier),
                                 "initial": jnp.asarray(task.projection)}}


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  del config
  return zero_shot.SCALE * normalize(x @ params["projection"]) \
      @ params[feature_cache.FROZEN]["classifier"].T


def penalty(params: Params) -> jax.Array:
  """sum((W - W0)^2), torch's MSELoss(reduction='sum') of the official code."""
  return jnp.sum((params["projection"] - params[feature_cache.FROZEN]["initial"]) ** 2)


def loss(params: Params, x: jax.Array, labels: jax.Array,
         config: Config) -> tuple[jax.Array, jax.Array]:
  scores = logits(params, x, config)
  ce = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
  return ce + config.regularization * penalty(params), scores


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
