"""TaskRes (clip_lora_jax/methods/taskres.py): t' = t + alpha x on the unnormalised base, literally,
against numpy; the base the run builds for it; learning; bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from separable import separable_task, train

from clip_lora_jax import evaluation, model
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, taskres, zero_shot

ADAM = dict(name="adam", learning_rate=2e-2, min_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8,
            weight_decay=5e-4)


def _unnormalised(task, seed=1):
  """`task` with an unnormalised base classifier, as the run builds it (norms 2 to 9)."""
  norms = np.random.default_rng(seed).uniform(2, 9, size=(task.num_classes, 1))
  return feature_cache.Task(**{**vars(task), "classifier": (task.classifier * norms
                                                           ).astype(np.float32)})


def test_logits_are_t_plus_alpha_x_normalised():
  task = _unnormalised(separable_task())
  params = taskres.init(task, taskres.Config())
  residual = np.random.default_rng(2).normal(size=task.classifier.shape).astype(np.float32)
  params = {**params, "residual": residual}
  for alpha in (0.5, 1.0, 0.0):
    t = task.classifier + alpha * residual  # the official `base_text_features + alpha * x`
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    f = task.val / np.linalg.norm(task.val, axis=-1, keepdims=True)
    np.testing.assert_allclose(taskres.logits(params, task.val, taskres.Config(alpha=alpha)),
                               100.0 * f @ t.T, rtol=1e-5, atol=1e-4)


def test_starts_at_zero_shot_whatever_the_norm_of_the_base():
  task = _unnormalised(separable_task())
  params = taskres.init(task, taskres.Config())
  assert set(feature_cache.trainable(params)) == {"residual"}
  assert not np.any(params["residual"])
  unit = feature_cache.Task(**{**vars(task), "classifier": np.asarray(
      model.normalize(task.classifier))})
  np.testing.assert_allclose(
      taskres.logits(params, task.val, taskres.Config()),
      zero_shot.logits(zero_shot.init(unit, zero_shot.Config()), task.val, zero_shot.Config()),
      rtol=1e-6, atol=1e-5)


def test_the_base_is_the_mean_of_unnormalised_template_embeddings():
  """What the run gives TaskRes (its CLASSIFIER = "raw_mean"): the official
  `torch.stack(text_embeddings).mean(1)` of `encode_text`, no normalisation."""
  assert taskres.CLASSIFIER == "raw_mean"
  config = model.get_config("tiny")
  params = model.init_params(jax.random.key(0), config)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 400, size=(3, 2, 6)), jnp.int32)
  each = model.encode_texts(params, ids.reshape(6, 6), config).reshape(3, 2, -1)
  np.testing.assert_allclose(evaluation.text_embedding_means(params, config, ids),
                             np.asarray(each).mean(axis=1), rtol=1e-5, atol=1e-6)


def test_learns_separable_features_and_leaves_the_base():
  task = _unnormalised(separable_task())
  config = taskres.Config()
  before = feature_cache.accuracy(taskres.logits(taskres.init(task, config), task.val, config),
                                  task.val_labels)
  params = train(taskres, config, task, ADAM, steps=100)
  after = feature_cache.accuracy(taskres.logits(params, task.val, config), task.val_labels)
  assert before < 50 and after == 100, (before, after)
  np.testing.assert_array_equal(params["frozen"]["base"], task.classifier)


@pytest.mark.parametrize("alpha", [-0.5, float("inf"), "0.5"])
def test_bad_alpha_is_refused_by_name(alpha):
  with pytest.raises(UserError, match=r"taskres\.alpha=.*: must be a finite number >= 0"):
    taskres.Config.from_dict({"alpha": alpha})
