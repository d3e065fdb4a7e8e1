"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022; official code github.com/gaopengcuhk/Tip-Adapter, read at
d0e2d6f): a key-value cache of the few-shot images added to zero-shot CLIP.

    logits = 100 * f W^T + alpha * exp(-beta * (1 - f F^T)) L

f: the unit test embedding; W: (C, E) the zero-shot classifier; F: (NK, E) the cache keys, one
per training shot, the mean of the unnormalised embeddings of its augmented views, normalised
(`build_cache_model`); L: (NK, C) the one-hot labels of the shots; beta the sharpness, alpha the
weight of the cache. Tip-Adapter (`tip_adapter`, `train_keys=False`) is training-free: alpha and
beta are searched on the validation shots (`search_hp`: beta over `search_steps[0]` values and
alpha over `search_steps[1]`, `i * (scale - 0.1) / steps + 0.1` for i < steps, beta-major, the
first strictly best pair; none above 0% leaves beta = alpha = 0 as the official code does).
Tip-Adapter-F (`tip_adapter_f`, `train_keys=True`) makes F trainable (a Linear initialised to
F), trains it with cross-entropy on the logits at the initial alpha and beta, then searches
alpha and beta with the trained keys. The two share this module and this config section; the
config files differ in `train_keys` and the training recipe.

Parameter pytree (searched values are 0-d arrays):

    {'keys': (NK, E),                     Tip-Adapter-F only: what training changes
     'frozen': {'keys': (NK, E),          Tip-Adapter only
                'values': (NK, C), 'classifier': (C, E), 'alpha': (), 'beta': ()}}

so the training-free variant has no trainable parameter and does not train whatever the step
count (`feature_cache.run`).

Departures from the official code:
- the search uses the run's validation shots (`min(shots, 4)` per class); the official code
  searches on the whole validation split, and on ImageNet on the test set;
- Tip-Adapter-F keeps the epoch best on the validation shots (`config.select_epoch`); the
  official code keeps the epoch best on the test set, and reports the larger of that test score
  and the one after the search;
- training batches are drawn from the `config.views` cached augmented views of every shot
  (torchvision RandomResizedCrop scale (0.08, 1) and flip, as CLIP-LoRA's training images),
  and so are the keys; the official code augments afresh every epoch, with scale (0.5, 1);
- float32 throughout, with full-precision matmuls (the official code runs CLIP in float16).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache
from clip_lora_jax.methods.zero_shot import SCALE
from clip_lora_jax.model import Params, normalize

SECTION = "tip_adapter"
INPUT = "embedding"
FROZEN = feature_cache.FROZEN
# exp(-beta * (1 - affinity)) magnifies affinity errors by beta (up to 50): no reduced-precision
# (TF32 / bf16) matmul passes on accelerators.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """train_keys: Tip-Adapter-F (the keys train) or Tip-Adapter (nothing trains). init_alpha,
  init_beta: the cache weight and sharpness before the search, and during Tip-Adapter-F's
  training. search: search alpha and beta on the validation shots (the official `search_hp`).
  search_scale: (beta, alpha) upper ends of the grids; search_steps: their sizes."""
  train_keys: bool = False
  init_alpha: float = 1.0
  init_beta: float = 1.0
  search: bool = True
  search_scale: tuple[float, float] = (7.0, 3.0)
  search_steps: tuple[int, int] = (200, 20)

  def __post_init__(self):
    for name in ("train_keys", "search"):
      if not isinstance(getattr(self, name), bool):
        raise UserError(f"{SECTION}.{name}={getattr(self, name)!r}: use True or False")
    for name in ("init_alpha", "init_beta"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
        raise UserError(f"{SECTION}.{name}={value!r}: must be a finite number >= 0")
    scale, steps = self.search_scale, self.search_steps
    if (len(scale) != 2 or not all(isinstance(s, (int, float)) and 0.1 < s < math.inf
                                   for s in scale)):
      raise UserError(f"{SECTION}.search_scale={scale!r}: use two finite numbers > 0.1, the "
                      "upper ends of the beta and alpha grids, e.g. (7, 3)")
    if len(steps) != 2 or not all(isinstance(s, int) and s > 0 for s in steps):
      raise UserError(f"{SECTION}.search_steps={steps!r}: use two positive integers, the sizes "
                      "of the beta and alpha grids, e.g. (200, 20)")


def cache_keys(task: feature_cache.Task) -> np.ndarray:
  """F: (N, E) row s the normalised mean of the unnormalised embeddings of shot s's views."""
  count = len(task.shots)
  sums = np.zeros((count, task.views.shape[-1]), np.float64)
  np.add.at(sums, task.view_shots, task.views.astype(np.float64))
  means = sums / np.bincount(task.view_shots, minlength=count)[:, None]
  return (means / np.linalg.norm(means, axis=-1, keepdims=True)).astype(np.float32)


def init(task: feature_cache.Task, config: Config) -> Params:
  """The cache of the training shots, alpha and beta at their initial values."""
  keys = jnp.asarray(cache_keys(task))
  frozen = {"values": jax.nn.one_hot(task.shot_labels, task.num_classes, dtype=jnp.float32),
            "classifier": jnp.asarray(task.classifier),
            "alpha": jnp.asarray(config.init_alpha, jnp.float32),
            "beta": jnp.asarray(config.init_beta, jnp.float32)}
  if config.train_keys:
    return {"keys": keys, FROZEN: frozen}
  return {FROZEN: {"keys": keys, **frozen}}


def tip_logits(f: jax.Array, keys: jax.Array, values: jax.Array, classifier: jax.Array,
               alpha: jax.Array, beta: jax.Array) -> jax.Array:
  """100 f W^T + alpha exp(-beta (1 - f F^T)) L for unit embeddings f: (B, E) -> (B, C)."""
  affinity = jnp.matmul(f, keys.T, precision=_PRECISION)
  cache = jnp.matmul(jnp.exp(-beta * (1.0 - affinity)), values, precision=_PRECISION)
  return SCALE * jnp.matmul(f, classifier.T, precision=_PRECISION) + alpha * cache


def _keys(params: Params) -> jax.Array:
  return params["keys"] if "keys" in params else params[FROZEN]["keys"]


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  del config
  frozen = params[FROZEN]
  return tip_logits(normalize(x), _keys(params), frozen["values"], frozen["classifier"],
                    frozen["alpha"], frozen["beta"])


# Mean cross-entropy of the Tip logits (at the frozen alpha and beta).
loss = feature_cache.cross_entropy_loss(logits)


def search_grid(scale: float, steps: int) -> np.ndarray:
  """The official grid: `[i * (scale - 0.1) / steps + 0.1 for i in range(steps)]`."""
  return np.array([i * (scale - 0.1) / steps + 0.1 for i in range(steps)], np.float32)


def _class_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The shots of each class for one-hot values (NK, C): indices (C, K) into the shots, K the
  most shots of a class, and which of them are real (a class with fewer is padded)."""
  labels = np.argmax(values, -1)
  counts = np.bincount(labels, minlength=values.shape[-1])
  order = np.argsort(labels, kind="stable")
  mask = np.arange(max(counts.max(), 1)) < counts[:, None]
  index = np.zeros(mask.shape, np.int32)
  index[mask] = order
  return index, mask


@jax.jit
def _grid_correct(f: jax.Array, labels: jax.Array, keys: jax.Array, index: jax.Array,
                  mask: jax.Array, classifier: jax.Array, betas: jax.Array,
                  alphas: jax.Array) -> jax.Array:
  """(betas, alphas) counts of correct top-1 predictions of the Tip logits of unit f. The
  values are one-hot, so exp(-beta (1 - f F^T)) L sums each class's shots: affinities grouped
  by class once, (M, C, K), then a sum per beta instead of an (M, NK) x (NK, C) product."""
  affinity = jnp.matmul(f, keys.T, precision=_PRECISION)[:, index]
  zero_shot = SCALE * jnp.matmul(f, classifier.T, precision=_PRECISION)
  classes = jnp.arange(zero_shot.shape[-1])

  def per_beta(beta):
    cache = jnp.where(mask, jnp.exp(-beta * (1.0 - affinity)), 0.0).sum(-1)
    scores = zero_shot + alphas[:, None, None] * cache
    # argmax(scores) == labels (the first of equal maxima), without XLA CPU's slow argmax.
    own = jnp.take_along_axis(scores, labels[None, :, None], -1)
    beaten = (scores > own) | ((scores == own) & (classes < labels[:, None]))
    return jnp.sum(~jnp.any(beaten, -1), -1)
  return jax.lax.map(per_beta, betas)


def search(params: Params, val: np.ndarray, val_labels: np.ndarray,
           config: Config) -> tuple[float, float]:
  """(beta, alpha) of the official `search_hp` on validation embeddings `val`: the first pair,
  beta-major, of the best top-1, if above 0%; else (0, 0), the official code's start."""
  betas = search_grid(config.search_scale[0], config.search_steps[0])
  alphas = search_grid(config.search_scale[1], config.search_steps[1])
  frozen = params[FROZEN]
  index, mask = _class_groups(np.asarray(frozen["values"]))
  correct = np.asarray(_grid_correct(
      normalize(jnp.asarray(val)), jnp.asarray(val_labels), _keys(params), jnp.asarray(index),
      jnp.asarray(mask), frozen["classifier"], jnp.asarray(betas), jnp.asarray(alphas)))
  if correct.max() <= 0:
    return 0.0, 0.0
  b, a = np.unravel_index(np.argmax(correct), correct.shape)
  return float(betas[b]), float(alphas[a])


def select(params: Params, task: feature_cache.Task, config: Config) -> Params:
  """alpha and beta searched on the validation shots (only), when `config.search`."""
  if not config.search:
    return params
  if not len(task.val):
    raise UserError(f"{SECTION}.search=True searches alpha and beta on the validation shots, and "
                    f"this task has none: pass --config.{SECTION}.search=False to keep "
                    "init_alpha and init_beta")
  beta, alpha = search(params, task.val, task.val_labels, config)
  return {**params, FROZEN: {**params[FROZEN], "alpha": np.asarray(alpha, np.float32),
                             "beta": np.asarray(beta, np.float32)}}


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
