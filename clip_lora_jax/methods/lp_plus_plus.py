"""LP++ (Huang, Shakeri, Dolz, Boudiaf, Bahig & Ben Ayed, "LP++: A Surprisingly Strong Linear
Probe for Few-Shot CLIP", CVPR 2024; official code FereshteShakeri/FewShot-CLIP-Strong-Baseline,
`methods/linear_probe_p2.py`, read at 4d1b771): a linear probe on the unit image embeddings
whose class scores blend in the zero-shot text scores with one learnt weight per class,

    logits = f @ W^T + b + (1_N alpha^T) * (f @ T^T),      f = normalise(x)

T: (C, E) the unit zero-shot classifier (no logit scale anywhere). The official code trains it
by full-batch block-coordinate descent with step sizes from Lipschitz estimates, no search:

    W0 = the sum of each class's features, b0 = 0, alpha0 = 250 * mean_{k,c} mean_{i in k} f_i.t_c
    lr_w = 4 N / lambda_max(F^T F),      lr_alpha = N / (4 max_c sum_i (f_i.t_c)^2)

then each of `epochs` (300) epochs: (W, b) take one SGD step (momentum 0.9) of the mean
cross-entropy at lr_w; every `alpha_every` (10) epochs alpha steps by -lr_alpha times its
gradient summed over all epochs so far (the official code never zeroes alpha's gradient, and so
neither does this one); the epoch that scores best on the validation shots is kept (the last of
equals, as the official `>=`). N counts the training rows: the features of one augmented view
of every shot (`config.views = 1`, RandomResizedCrop 0.5-1 and flip in the official code). The
optimiser is not one optax rule over the pytree, so the whole descent runs in `init` (one
compiled `lax.scan`, seconds) and the shared loop does not train (`config.epochs = 0`). The
parameter pytree

    {"w": (C, E), "b": (C,), "alpha": (C,), "frozen": {"classifier": (C, E)}}

counts C x (E + 2) parameters.

Departures from the official code: b starts at 0 (torch's nn.Linear default there: uniform
+-1/sqrt(E), random); W0 divides the class sums by the number of views per shot (the same at
one view); float32 throughout (the official classifier is fp16 with CLIP's fp16 features); the
views are those of the run (`clip_lora_jax.features`: the LoRA run's augmentation); the
validation shots are the run's; on ImageNet the classifier is CoOp's 7 templates plus "a photo
of a {}." (`coop_ensemble`), the official code's the 7 alone. The configuration's `case` and
`lr_temp0` keys of the official base.yaml are not read by its LP++ code, and have no
counterpart here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache
from clip_lora_jax.model import Params, normalize

SECTION = "lp_plus_plus"
INPUT = "embedding"
ALPHA_SCALE = 250.0  # The official `250 / shots * alpha_tilde * shots`.


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """epochs: full-batch descent steps (the official 300); alpha_every: epochs between the
  blending weights' steps (10); momentum: of the (W, b) SGD steps (0.9)."""
  epochs: int = 300
  alpha_every: int = 10
  momentum: float = 0.9

  def __post_init__(self):
    if not isinstance(self.epochs, int) or self.epochs <= 0:
      raise UserError(f"lp_plus_plus.epochs={self.epochs!r}: must be a positive integer")
    if not isinstance(self.alpha_every, int) or self.alpha_every <= 0:
      raise UserError(f"lp_plus_plus.alpha_every={self.alpha_every!r}: must be a positive "
                      "integer")
    if not 0.0 <= self.momentum < 1.0:
      raise UserError(f"lp_plus_plus.momentum={self.momentum!r}: must be in [0, 1)")


def step_sizes(f: np.ndarray, classifier: np.ndarray) -> tuple[float, float]:
  """(lr_w, lr_alpha) of unit features f (N, E) and text classifier (C, E), as the module
  docstring says (float64 eigenvalues on the host)."""
  f = np.asarray(f, np.float64)
  text = f @ np.asarray(classifier, np.float64).T
  lr_w = 4.0 * len(f) / np.linalg.eigvalsh(f.T @ f)[-1]
  lr_alpha = len(f) / (4.0 * np.max(np.sum(text ** 2, axis=0)))
  return float(lr_w), float(lr_alpha)


def start(f: np.ndarray, labels: np.ndarray, classifier: np.ndarray, views: int) -> Params:
  """The data-driven initialisation: W0 the class sums of f (over `views` views per shot),
  b0 = 0, every alpha_c the official scalar of the module docstring (over the classes that
  have shots)."""
  f, classes = np.asarray(f, np.float64), classifier.shape[0]
  onehot = np.eye(classes)[labels]
  text = f @ np.asarray(classifier, np.float64).T
  counts = onehot.sum(0)
  present = counts > 0  # a class without shots has no mean (and no row in the official code)
  means = (onehot.T @ text)[present] / counts[present, None]  # class k's mean of f.t_c
  return {"w": jnp.asarray(onehot.T @ f / views, jnp.float32),
          "b": jnp.zeros((classes,), jnp.float32),
          "alpha": jnp.full((classes,), ALPHA_SCALE * means.mean(), jnp.float32)}


def blend(params: Params, f: jax.Array, text: jax.Array) -> jax.Array:
  """The official form on unit features f with text logits `text` = f T^T: vision logits
  + (1 alpha^T) * text logits."""
  vision = f @ params["w"].T + params["b"]
  return vision + (jnp.ones((f.shape[0], 1)) @ params["alpha"][None, :]) * text


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  del config
  f = normalize(x)
  return blend(params, f, f @ params[feature_cache.FROZEN]["classifier"].T)


def _loss(params: Params, f: jax.Array, text: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(blend(params, f, text), labels).mean()


@functools.partial(jax.jit, static_argnames=("config",))
def descend(params: Params, f: jax.Array, labels: jax.Array, val: jax.Array,
            val_labels: jax.Array, classifier: jax.Array, lr_w: float, lr_alpha: float,
            config: Config) -> Params:
  """`config.epochs` epochs of the official descent from `params`; those of the epoch best on
  (val, val_labels) (the last of equals), or of the last epoch when there is no validation.
  The text logits of the fixed features are computed once, not per epoch."""
  text, val_text = f @ classifier.T, val @ classifier.T

  def epoch(carry, index):
    params, velocity, alpha_grad, best, best_top1 = carry
    grads = jax.grad(_loss)(params, f, text, labels)
    velocity = jax.tree.map(lambda v, g: config.momentum * v + g, velocity,
                            {"w": grads["w"], "b": grads["b"]})
    alpha_grad = alpha_grad + grads["alpha"]
    alpha = jnp.where((index + 1) % config.alpha_every == 0,
                      params["alpha"] - lr_alpha * alpha_grad, params["alpha"])
    params = {"w": params["w"] - lr_w * velocity["w"], "b": params["b"] - lr_w * velocity["b"],
              "alpha": alpha}
    top1 = (jnp.mean(jnp.argmax(blend(params, val, val_text), -1) == val_labels)
            if val.shape[0] else jnp.float32(0.0))
    better = top1 >= best_top1
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
    return (params, velocity, alpha_grad, best, jnp.maximum(top1, best_top1)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  carry = (params, {"w": zeros["w"], "b": zeros["b"]}, zeros["alpha"], params,
           jnp.float32(-1.0))
  (_, _, _, best, _), _ = jax.lax.scan(epoch, carry, jnp.arange(config.epochs))
  return best


def init(task: feature_cache.Task, config: Config) -> Params:
  """LP++'s initialisation, step sizes and descent on the views (module docstring)."""
  f = np.asarray(normalize(jnp.asarray(task.views)))
  views = len(task.views) // len(task.shots)
  lr_w, lr_alpha = step_sizes(f, task.classifier)
  classifier = jnp.asarray(task.classifier)
  params = descend(start(f, task.view_labels, task.classifier, views), jnp.asarray(f),
                    jnp.asarray(task.view_labels), normalize(jnp.asarray(task.val)),
                    jnp.asarray(task.val_labels), classifier, lr_w, lr_alpha, config)
  return {**params, feature_cache.FROZEN: {"classifier": classifier}}


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
