"""ProLIP (clip_lora_jax/methods/prolip.py): zero-shot CLIP at the start, the official logits and
penalty against numpy, learning, bad settings."""

import jax
import numpy as np
import optax
import pytest
from separable import separable_task, train

from clip_lora_jax import model
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, prolip, zero_shot

ADAM = dict(name="adam", learning_rate=1e-2, min_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-4,
            weight_decay=0.0)


def test_starts_exactly_at_zero_shot_clip():
  """W = W0: the logits of pooled features are those of their projected embeddings."""
  task = separable_task(width=24)
  params = prolip.init(task, prolip.Config())
  embeddings = model.project_images({"visual_projection": {"kernel": task.projection}}, task.val)
  np.testing.assert_array_equal(
      prolip.logits(params, task.val, prolip.Config()),
      zero_shot.logits(zero_shot.init(task, zero_shot.Config()), embeddings, zero_shot.Config()))
  assert set(feature_cache.trainable(params)) == {"projection"}
  assert float(prolip.penalty(params)) == 0.0


def test_logits_and_loss_are_the_official_ones():
  task = separable_task(width=24)
  w = task.projection + 0.1 * np.random.default_rng(3).normal(size=task.projection.shape)
  params = {**prolip.init(task, prolip.Config()), "projection": w.astype(np.float32)}
  x = task.val @ params["projection"]  # `x_before_proj @ self.vit_proj`
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = 100.0 * x @ task.classifier.T
  penalty = np.sum((params["projection"] - task.projection) ** 2)  # MSELoss(reduction='sum')
  ce = np.mean(np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
               + logits.max(-1) - logits[np.arange(len(logits)), task.val_labels])
  value, scores = prolip.loss(params, task.val, task.val_labels, prolip.Config(regularization=0.25))
  np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(prolip.penalty(params), penalty, rtol=1e-5)
  np.testing.assert_allclose(value, ce + 0.25 * penalty, rtol=1e-5)
  # The penalty's gradient is 2 lam (W - W0), the classifier gets none (it is not trained).
  grad = jax.jit(jax.grad(lambda p: prolip.loss(p, task.val, task.val_labels,
                                                prolip.Config(regularization=0.25))[0]))
  g_ce = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      prolip.logits(p, task.val, prolip.Config()), task.val_labels).mean()))
  np.testing.assert_allclose(grad(params)["projection"] - g_ce(params)["projection"],
                             0.5 * (params["projection"] - task.projection), rtol=1e-4, atol=1e-6)


def test_learns_separable_features_and_leaves_w0_and_the_classifier():
  task = separable_task(width=24)
  config = prolip.Config(regularization=1e-3)
  before = feature_cache.accuracy(prolip.logits(prolip.init(task, config), task.val, config),
                                  task.val_labels)
  params = train(prolip, config, task, ADAM, steps=100)
  after = feature_cache.accuracy(prolip.logits(params, task.val, config), task.val_labels)
  assert before < 50 and after == 100, (before, after)
  np.testing.assert_array_equal(params["frozen"]["initial"], task.projection)
  np.testing.assert_array_equal(params["frozen"]["classifier"], task.classifier)
  assert np.any(params["projection"] != task.projection)


@pytest.mark.parametrize("value", [-1.0, float("nan"), None])
def test_bad_regularization_is_refused_by_name(value):
  with pytest.raises(UserError, match=r"prolip\.regularization=.*: must be a finite number >= 0"):
    prolip.Config.from_dict({"regularization": value})
