"""Synthetic feature-cache tasks: numpy arrays shaped as `feature_cache.load_task` builds them,
no model and no data. Its fixtures are registered by tests/conftest.py (a second conftest module
would shadow the one the other tests import by name)."""

from __future__ import annotations

import numpy as np
import pytest

from clip_lora_jax.methods import feature_cache


def synthetic_task(classes: int = 3, shots: int = 4, views: int = 5, width: int = 8,
                   val_shots: int = 2, noise: float = 0.3, seed: int = 0) -> feature_cache.Task:
  """Separable unnormalised embeddings: class c's samples are 3 x (centre_c + noise), centres
  random unit vectors; views are noisy copies of their shot, in `load_task`'s order (view v of
  the shots in a permutation per v); the zero-shot classifier is random unit vectors."""
  rng = np.random.default_rng(seed)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  centres = unit(rng.normal(size=(classes, width)))
  sample = lambda labels: 3.0 * (centres[labels] + noise * rng.normal(size=(len(labels), width)))
  shot_labels = np.repeat(np.arange(classes), shots)
  shot_x = sample(shot_labels)
  view_shots = np.concatenate([rng.permutation(len(shot_labels)) for _ in range(views)])
  view_x = shot_x[view_shots] + noise * rng.normal(size=(len(view_shots), width))
  val_labels = np.repeat(np.arange(classes), val_shots)
  f32 = lambda a: np.asarray(a, np.float32)
  return feature_cache.Task(
      views=f32(view_x), view_labels=shot_labels[view_shots].astype(np.int32),
      view_shots=view_shots, shots=f32(shot_x), shot_labels=shot_labels.astype(np.int32),
      val=f32(sample(val_labels)), val_labels=val_labels.astype(np.int32),
      classifier=f32(unit(rng.normal(size=(classes, width)))),
      projection=np.zeros((width, width), np.float32))


@pytest.fixture(scope="session")
def make_task():
  """`synthetic_task`, for tests that need a variant."""
  return synthetic_task


@pytest.fixture(scope="session")
def task() -> feature_cache.Task:
  return synthetic_task()
