"""Feature-cache tasks built by hand from numpy arrays (no model, no data), and the shared train
step run on them: what the tests of tests/methods/ learn from.

The classes are separable clusters of features whose zero-shot classifier is unrelated to them
(the class centres buried in noise, `hint` their weight), so zero-shot accuracy is poor and
only training can fix it.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from clip_lora_jax import training
from clip_lora_jax.methods import feature_cache


def separable_task(classes: int = 6, shots: int = 4, views: int = 3, val: int = 4,
                   embed: int = 16, width: int | None = None, hint: float = 0.05,
                   seed: int = 0) -> feature_cache.Task:
  """A Task of `classes` well-separated clusters: `views` noisy views of `shots` shots per
  class, `val` validation samples per class; inputs of `width` dimensions (pooled features,
  INPUT = "features") or, when None, of `embed` (embeddings). The projection is a random
  (width, embed) matrix and the classifier the unit directions of `hint` x each class centre's
embedding plus standard normal noise."""
  rng = np.random.default_rng(seed)
  dim = width or embed
  centres = 3.0 * rng.normal(size=(classes, dim))
  def samples(labels: np.ndarray) -> np.ndarray:
    return (centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))).astype(np.float32)

  shot_labels = np.repeat(np.arange(classes), shots)
  view_shots = np.tile(np.arange(len(shot_labels)), views)
  val_labels = np.repeat(np.arange(classes), val)
  projection = (rng.normal(size=(dim, embed)) / np.sqrt(dim)).astype(np.float32)
  classifier = hint * (centres @ projection if width else centres) + rng.normal(size=(classes, embed))
  return feature_cache.Task(
      views=samples(shot_labels[view_shots]), view_labels=shot_labels[view_shots],
      view_shots=view_shots, shots=samples(shot_labels), shot_labels=shot_labels,
      val=samples(val_labels), val_labels=val_labels,
      classifier=(classifier / np.linalg.norm(classifier, axis=-1, keepdims=True)
                  ).astype(np.float32),
      projection=projection)


def train(method, config: feature_cache.MethodConfig, task: feature_cache.Task,
          optimizer: dict, steps: int, batch_size: int = 16) -> dict:
  """`steps` steps of `method.loss` from `method.init` with the run's own train step and
  optimizer (`optimizer`: a config.optimizer dict); the final parameters, frozen entry
  included, as numpy."""
  params = method.init(task, config)
  frozen = params.get(feature_cache.FROZEN, {})
  opt = training.make_optimizer(ml_collections.ConfigDict(optimizer), steps)
  start = feature_cache.trainable(params)
  state = {"step": np.zeros((), np.int32), "params": start, "opt_state": opt.init(start)}
  step = feature_cache.make_train_step(method, config, opt)
  for k in range(steps):
    rows = feature_cache.batch_indices(len(task.views), batch_size, 0, k)
    state, _ = step(state, frozen, task.views[rows], task.view_labels[rows])
  trained = {**state["params"], **({feature_cache.FROZEN: frozen} if frozen else {})}
  return jax.tree.map(np.asarray, trained)
