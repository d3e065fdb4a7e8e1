"""CLIP-Adapter (clip_lora_jax/methods/clip_adapter.py): the residual blend of the official code,
literally, against numpy; torch nn.Linear's initialisation; learning; bad settings."""

import numpy as np
import pytest
from separable import separable_task, train

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import clip_adapter, feature_cache, zero_shot

SGD = dict(name="sgd", momentum=0.9, learning_rate=2e-2, min_learning_rate=0.0, b1=0.9,
           b2=0.999, eps=1e-8, weight_decay=5e-4)


def _numpy_logits(params, x, ratio):
  """The official forward: x = adapter(f); f = ratio * x + (1 - ratio) * f; 100 * cos."""
  relu = lambda v: np.maximum(v, 0.0)
  a = relu(relu(x @ params["down"]) @ params["up"])
  f = ratio * a + (1 - ratio) * x
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  return 100.0 * f @ params["frozen"]["classifier"].T


def test_logits_are_the_official_residual_blend():
  task = separable_task()
  params = clip_adapter.init(task, clip_adapter.Config())
  for ratio in (0.2, 0.0, 0.9):
    config = clip_adapter.Config(ratio=ratio)
    np.testing.assert_allclose(clip_adapter.logits(params, task.val, config),
                               _numpy_logits(params, task.val, ratio), rtol=1e-5, atol=1e-4)
  # ratio 0: the adapter is out, zero-shot CLIP's logits exactly.
  np.testing.assert_array_equal(
      clip_adapter.logits(params, task.val, clip_adapter.Config(ratio=0.0)),
      zero_shot.logits(zero_shot.init(task, zero_shot.Config()), task.val, zero_shot.Config()))


def test_init_is_torch_linear_shaped_and_bounded():
  task = separable_task(embed=32)
  params = clip_adapter.init(task, clip_adapter.Config())
  assert params["down"].shape == (32, 8) and params["up"].shape == (8, 32)
  assert np.abs(params["down"]).max() <= 1 / np.sqrt(32)
  assert np.abs(params["up"]).max() <= 1 / np.sqrt(8)
  assert np.abs(params["up"]).max() > 0.8 / np.sqrt(8)  # uniform over the whole range
  assert feature_cache.num_parameters(params) == 2 * 32 * 8
  np.testing.assert_array_equal(params["frozen"]["classifier"], task.classifier)


def test_learns_separable_features_and_leaves_the_classifier():
  task = separable_task()
  config = clip_adapter.Config()
  before = feature_cache.accuracy(
      clip_adapter.logits(clip_adapter.init(task, config), task.val, config), task.val_labels)
  params = train(clip_adapter, config, task, SGD, steps=150)
  after = feature_cache.accuracy(clip_adapter.logits(params, task.val, config), task.val_labels)
  assert before < 50 and after == 100, (before, after)
  assert set(feature_cache.trainable(params)) == {"down", "up"}
  np.testing.assert_array_equal(params["frozen"]["classifier"], task.classifier)


@pytest.mark.parametrize("settings, message", [
    ({"ratio": 1.5}, r"clip_adapter\.ratio=1\.5: must be a number in \[0, 1\]"),
    ({"ratio": float("nan")}, r"clip_adapter\.ratio=nan"),
    ({"reduction": 0}, r"clip_adapter\.reduction=0: must be a positive integer"),
    ({"reduction": 2.5}, r"clip_adapter\.reduction=2\.5"),
])
def test_bad_settings_are_refused_by_name(settings, message):
  with pytest.raises(UserError, match=message):
    clip_adapter.Config.from_dict(settings)


def test_a_reduction_wider_than_the_embedding_is_refused():
  with pytest.raises(UserError, match=r"clip_adapter\.reduction=64: leaves no hidden unit"):
    clip_adapter.init(separable_task(embed=16), clip_adapter.Config(reduction=64))
