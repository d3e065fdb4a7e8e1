"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature
Adapters", IJCV 2023) on frozen CLIP image embeddings.

A bottleneck MLP A, Linear(E, E/r, no bias) - ReLU - Linear(E/r, E, no bias) - ReLU, reads the
unnormalised image embedding f and is blended into it with the residual ratio; the zero-shot
classifier W of the dataset's hand-crafted template scores the result:

    f' = ratio * A(f) + (1 - ratio) * f,      logits = 100 * normalise(f') @ W^T

trained with cross-entropy. As in the official `clip_adapter.py`, f is not normalised before the
adapter, ratio = 0.2 and r = 4 (E = 512 for ViT-B/16: 131,072 parameters; the official file
hard-codes E = 1024, RN50's). The parameters are one pytree

    {'down': (E, E/r), 'up': (E/r, E), 'frozen': {'classifier': (C, E)}}

with kernels in `x @ kernel` layout, initialised as torch's nn.Linear (uniform in
+-1/sqrt(fan_in)) from a fixed key: the run's seed picks the shots and the augmentations.

Departures from the official code: the official repository releases only the model file (its
README: "follow CoOp's command"), so the recipe (configs/clip_adapter.py) is CoOp's few-shot
one: SGD (momentum 0.9, weight decay 5e-4), lr 0.002 with cosine decay, batch 32, 50 / 100 / 200
epochs at 1 / 2-4 / 8-16 shots (ImageNet 50), but without CoOp's one warm-up epoch at lr 1e-5 and
with the learning rate decayed every step, not every epoch. Training reads `config.views` cached
augmented views of every shot instead of a fresh augmentation each epoch. The paper tunes the
ratio per dataset; its values are not published, so 0.2 (the code's) is used for every dataset.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, zero_shot
from clip_lora_jax.model import Params, normalize

SECTION = "clip_adapter"
INPUT = "embedding"
INIT_KEY = 0  # The adapter's initial weights: a fixed draw (see the module docstring).


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """ratio: the adapter's weight in the residual blend, in [0, 1] (0 is zero-shot CLIP).
  reduction: the bottleneck factor r (hidden width E // r), a positive integer at most E."""
  ratio: float = 0.2
  reduction: int = 4

  def __post_init__(self):
    if not (isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
            and math.isfinite(self.ratio) and 0 <= self.ratio <= 1):
      raise UserError(f"{SECTION}.ratio={self.ratio!r}: must be a number in [0, 1]")
    if not (isinstance(self.reduction, int) and not isinstance(self.reduction, bool)
            and self.reduction >= 1):
      raise UserError(f"{SECTION}.reduction={self.reduction!r}: must be a positive integer")


def _linear_kernel(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
  """(fan_in, fan_out) kernel drawn as torch's nn.Linear weight: U(-1/sqrt(fan_in), +...)."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -bound, bound)


def init(task: feature_cache.Task, config: Config) -> Params:
  width = task.classifier.shape[1]
  hidden = width // config.reduction
  if hidden < 1:
    raise UserError(f"{SECTION}.reduction={config.reduction}: leaves no hidden unit for "
                    f"embeddings of width {width}; use at most {width}")
  down, up = jax.random.split(jax.random.key(INIT_KEY))
  return {"down": _linear_kernel(down, width, hidden), "up": _linear_kernel(up, hidden, width),
          feature_cache.FROZEN: {"classifier": jnp.asarray(task.classifier)}}


def adapted(params: Params, x: jax.Array, config: Config) -> jax.Array:
  """f' = ratio * A(f) + (1 - ratio) * f of unnormalised embeddings f = x, (B, E)."""
  a = jax.nn.relu(jax.nn.relu(x @ params["down"]) @ params["up"])
  return config.ratio * a + (1 - config.ratio) * x


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  return zero_shot.SCALE * normalize(adapted(params, x, config)) \
      @ params[feature_cache.FROZEN]["classifier"].T


loss = feature_cache.cross_entropy_loss(logits)


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
