"""ZS-LP and CLAP (Silva-Rodriguez, Hajimiri, Ben Ayed & Dolz, "A Closer Look at the Few-Shot
Adaptation of Large Vision-Language Models", CVPR 2024; official code jusiro/CLAP,
`trainers/adapters.py`, read at 2b18ea4). ZS-LP is a linear probe of class prototypes P (C, E)
started from the zero-shot text prototypes T, scoring with CLIP's temperature:

    logits = 100 * normalise(f) @ normalise(P)^T,                        P0 = T
    loss   = CE(logits, y) + mean_c lambda_c * ||P_c - T_c||^2           (CLAP only)

CLAP adds the class-wise penalty keeping each prototype near its zero-shot one, with the
multipliers fixed from the zero-shot model on the support set (`constraint`):
  "none"         ZS-LP: no penalty;
  "l2"           CLAP (the paper's and the README's): lambda_c = the mean zero-shot softmax
                 probability of class c over the training views of class c,
                 softmax(100 * normalise(f) @ normalise(T)^T);
  "l2_balanced"  every lambda_c = 1 (the official "balanced" variant).
T is the mean of the templates' unnormalised text embeddings, as the official
`_get_base_text_features` (`CLASSIFIER = "raw_mean"`): its norm sets the scale of both the step
size and the penalty. The parameter pytree

    {"prototypes": (C, E), "frozen": {"classifier": T (C, E), "multipliers": (C,)}}

counts C x E parameters. The recipe (configs/clap.py): SGD, lr 0.1, momentum 0.9, no weight
decay, cosine over 300 epochs, batch 256 over the features of 20 augmented views of every shot,
epochs of ceil(shots x classes / 256) batches, the last epoch kept (no validation).

Departures from the official code: no warm-up epoch at lr 1e-5, and the cosine runs per step,
not per epoch (the shared schedule); an epoch has ceil(N / 256) batches where Dassl's loader
drops the last partial one (floor) once N >= 256; the views are those of the run
(`clip_lora_jax.features`: the LoRA run's augmentation, not Dassl's scale 0.08-1 crop); the
official "adaptative" outer steps, "corrected"/"constant" multipliers and cosine distance,
which its scripts do not use, are not implemented.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, zero_shot
from clip_lora_jax.model import Params, normalize

SECTION = "clap"
INPUT = "embedding"
CLASSIFIER = "raw_mean"
CONSTRAINTS = ("none", "l2", "l2_balanced")


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """constraint: "none" (ZS-LP), "l2" (CLAP) or "l2_balanced" (the module docstring)."""
  constraint: str = "l2"

  def __post_init__(self):
    if self.constraint not in CONSTRAINTS:
      raise UserError(f"clap.constraint={self.constraint!r}: use one of "
                      f"{', '.join(CONSTRAINTS)}")


def multipliers(views: np.ndarray, labels: np.ndarray, classifier: np.ndarray,
                config: Config) -> jax.Array:
  """(C,) lambda: the mean zero-shot probability of each class on its own views ("l2"), or
  ones (otherwise; unused by "none")."""
  classes = classifier.shape[0]
  if config.constraint != "l2":
    return jnp.ones((classes,), jnp.float32)
  probs = jax.nn.softmax(zero_shot.SCALE * normalize(jnp.asarray(views))
                         @ normalize(jnp.asarray(classifier)).T)
  onehot = jax.nn.one_hot(labels, classes)
  return jnp.diag(probs.T @ onehot) / jnp.maximum(onehot.sum(0), 1)  # 0 for a class without views


def init(task: feature_cache.Task, config: Config) -> Params:
  """P0 = T (two buffers: the train step donates P's)."""
  return {"prototypes": jnp.array(task.classifier),
          feature_cache.FROZEN: {"classifier": jnp.array(task.classifier),
                                 "multipliers": multipliers(task.views, task.view_labels,
                                                            task.classifier, config)}}


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  del config
  return zero_shot.SCALE * normalize(x) @ normalize(params["prototypes"]).T


def penalty(params: Params) -> jax.Array:
  """mean_c lambda_c ||P_c - T_c||^2."""
  frozen = params[feature_cache.FROZEN]
  distance = jnp.sum((params["prototypes"] - frozen["classifier"]) ** 2, axis=-1)
  return jnp.mean(frozen["multipliers"] * distance)


def loss(params: Params, x: jax.Array, labels: jax.Array,
         config: Config) -> tuple[jax.Array, jax.Array]:
  scores = logits(params, x, config)
  value = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
  if config.constraint != "none":
    value = value + penalty(params)
  return value, scores


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
