"""GDA, Gaussian discriminant analysis (Wang, Lian & Gu, "A Hard-to-Beat Baseline for
Training-free CLIP-based Adaptation", ICLR 2024; official code github.com/mrflogs/ICLR24, read
at 560fe21, `main_few_shots.py`): a training-free linear classifier of the few-shot embeddings,
ensembled with zero-shot CLIP.

Every augmented view of every shot is a sample x_i (the unit embedding), of class y_i. With
mu_c the mean of class c's samples, the centred samples z_i = x_i - mu_{y_i} (N x D) and S their
covariance (`torch.cov`: mean-subtracted, divided by N - 1), the shared precision is the
official shrinkage estimate

    P = D * pinv((N - 1) S + tr(S) I)

and the classifier with uniform priors p_c = 1 / C

    W = mu P  (C, D),     b_c = log p_c - mu_c P mu_c^T / 2,
    logits = 100 f W_zs^T + alpha (f W^T + b)

f the unit test embedding, W_zs the zero-shot classifier. alpha is the first of `alphas` (the
official 1e-4, ..., 100) of strictly best top-1 on the validation shots; if none scores above
0%, 0.1 (the official default).

Parameter pytree (nothing trains: all frozen):

    {'frozen': {'weights': (C, E), 'bias': (C,), 'classifier': (C, E), 'alpha': ()}}

Departures from the official code:
- alpha is searched on the run's validation shots (`min(shots, 4)` per class); the official
  code searches on the whole validation split, and on ImageNet on the test set;
- the samples are the `config.views` cached augmented views of every shot (torchvision
  RandomResizedCrop scale (0.08, 1) and flip, as CLIP-LoRA's training images); the official
  code draws its 10 views with scale (0.5, 1);
- the estimate is computed in float64 on the host and stored in float32 (the official code:
  float32 on the GPU).
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

SECTION = "gda"
INPUT = "embedding"
FROZEN = feature_cache.FROZEN
DEFAULT_ALPHA = 0.1  # The official choice when no alpha scores above 0% on validation.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """alphas: the weights of the GDA logits searched on the validation shots, in order."""
  alphas: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)

  def __post_init__(self):
    if not self.alphas or not all(isinstance(a, (int, float)) and 0.0 <= a < math.inf
                                  for a in self.alphas):
      raise UserError(f"{SECTION}.alphas={self.alphas!r}: use one or more finite numbers >= 0, "
                      "e.g. (0.0001, 0.001, 0.01, 0.1, 1, 10, 100)")


def fit(x: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(W, b) of GDA on unit samples x (N, D) with labels, as the module docstring says."""
  order = np.argsort(labels, kind="stable")
  centred = x[order].astype(np.float64)  # grouped by class, centred in place below
  counts = np.bincount(labels, minlength=num_classes)
  ends = np.cumsum(counts)
  means = np.empty((num_classes, x.shape[1]))
  for c, (start, end) in enumerate(zip(ends - counts, ends)):
    means[c] = centred[start:end].mean(0)
    centred[start:end] -= means[c]
  count, dim = centred.shape
  mean = centred.mean(0)  # 0 up to rounding; torch.cov subtracts it
  covariance = (centred.T @ centred - count * np.outer(mean, mean)) / (count - 1)
  precision = dim * np.linalg.pinv((count - 1) * covariance + np.trace(covariance) * np.eye(dim))
  weights = means @ precision
  bias = np.log(1.0 / num_classes) - np.einsum("cd,cd->c", weights, means) / 2
  return weights.astype(np.float32), bias.astype(np.float32)


def init(task: feature_cache.Task, config: Config) -> Params:
  """The closed form on the normalised views; alpha at the official default until `select`."""
  del config
  empty = np.flatnonzero(np.bincount(task.view_labels, minlength=task.num_classes) == 0)
  if len(empty):
    raise UserError(f"gda needs a mean of every class, and classes {empty.tolist()} have no "
                    "training shot: use a dataset whose every class has training images")
  views = np.asarray(normalize(jnp.asarray(task.views)))
  weights, bias = fit(views, task.view_labels, task.num_classes)
  return {FROZEN: {"weights": jnp.asarray(weights), "bias": jnp.asarray(bias),
                   "classifier": jnp.asarray(task.classifier),
                   "alpha": jnp.asarray(DEFAULT_ALPHA, jnp.float32)}}


def _parts(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(zero-shot logits, GDA logits) of inputs x."""
  frozen, f = params[FROZEN], normalize(x)
  return (SCALE * jnp.matmul(f, frozen["classifier"].T, precision=_PRECISION),
          jnp.matmul(f, frozen["weights"].T, precision=_PRECISION) + frozen["bias"])


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  del config
  zero_shot, gda = _parts(params, x)
  return zero_shot + params[FROZEN]["alpha"] * gda


def select(params: Params, task: feature_cache.Task, config: Config) -> Params:
  """alpha searched on the validation shots (only)."""
  if not len(task.val):
    raise UserError(f"{SECTION} searches its alpha on the validation shots, and this task has "
                    "none: use a dataset and shot count with validation shots")
  zero_shot, gda = _parts(params, jnp.asarray(task.val))
  correct = [int(np.sum(np.argmax(np.asarray(zero_shot + alpha * gda), -1) == task.val_labels))
             for alpha in config.alphas]
  alpha = config.alphas[int(np.argmax(correct))] if max(correct) > 0 else DEFAULT_ALPHA
  return {FROZEN: {**params[FROZEN], "alpha": np.asarray(alpha, np.float32)}}


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
