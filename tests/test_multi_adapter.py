"""Many adapters in one batch (clip_lora_jax.multi_adapter) against merged single-task inference
(`methods.logits_fn`, what eval.py scores), per example, on the tiny random CLIP."""

import jax
import numpy as np
import pytest

from clip_lora_jax import base as base_lib
from clip_lora_jax import lora, methods, multi_adapter
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import block_lora

TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def base():
  return base_lib.load_base_model("tiny", random_init=True, seed=0)


def random_adapter(base, config, seed, fingerprint=None):
  """An adapter of `config` with every factor random (b != 0, so each task differs)."""
  rng = np.random.default_rng(seed)
  factors = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32),
                         lora.abstract_init(base.config, config))
  return lora.Adapter(factors, config, base.name, base.config,
                      fingerprint or base.fingerprint, None, TEMPLATE)


@pytest.fixture(scope="module")
def adapters(base):
  """Adapters that differ in rank, layers, matrices, towers, scale and method."""
  return [random_adapter(base, lora.LoRAConfig(), 1),
          random_adapter(base, lora.LoRAConfig(rank=4, matrices=("q", "v", "o"), layers=(1,),
                                               alpha=2.0, scaling="linear"), 2),
          random_adapter(base, block_lora.BlockLoRAConfig(blocks=4), 3),
          random_adapter(base, block_lora.BlockLoRAConfig(rank=4, blocks=2, split="rank",
                                                          encoders="vision"), 4)]


CLASS_NAMES = [("cat", "dog"), ("annual crop", "forest", "river"), ("x", "y", "z"),
               ("red", "green")]


def test_a_mixed_batch_equals_merged_inference_of_each_task(base, adapters):
  serve = multi_adapter.MultiAdapterClassifier.build(base, adapters, CLASS_NAMES,
                                                     [[TEMPLATE]] * len(adapters))
  images = np.asarray(jax.random.normal(jax.random.key(9), (8, 32, 32, 3)))
  task_ids = np.array([0, 1, 2, 3, 3, 2, 1, 0])
  logits = np.asarray(serve(images, task_ids))
  assert logits.shape == (8, 3)
  for task, (adapter, names) in enumerate(zip(adapters, CLASS_NAMES)):
    rows = task_ids == task
    merged = np.asarray(methods.logits_fn(base, adapter, names, [TEMPLATE])(images[rows]))
    # float32: within 1e-5 of the largest logit (cosines; measured about 1e-7 apart).
    assert np.abs(logits[rows, :len(names)] - merged).max() <= 1e-5 * np.abs(merged).max()
    assert (logits[rows, :len(names)].argmax(-1) == merged.argmax(-1)).all()
    assert np.isneginf(logits[rows, len(names):]).all()


def test_stacked_pairs_fold_the_scale_and_pad_with_zeros(base, adapters):
  stacked = multi_adapter.stack_adapters(adapters[:2])
  a, b = (stacked["vision"]["layers_1"]["attn"]["q"][k] for k in "ab")
  assert a.shape == (2, 64, 4) and b.shape == (2, 4, 64)
  first = adapters[0].lora["vision"]["layers_1"]["attn"]["q"]
  np.testing.assert_array_equal(a[0, :, :2], first["a"])
  np.testing.assert_allclose(b[0, :2], first["b"] * adapters[0].config.scale, rtol=1e-6)
  assert not np.any(a[0, :, 2:]) and not np.any(b[0, 2:])
  # The second adapter leaves layer 0 and k alone: zero pairs there.
  assert not np.any(stacked["vision"]["layers_0"]["attn"]["q"]["a"][1])
  assert not np.any(stacked["vision"]["layers_1"]["attn"]["k"]["b"][1])


def test_adapters_of_another_base_or_method_are_refused(base, adapters):
  other = random_adapter(base, lora.LoRAConfig(), 5, fingerprint="0" * 16)
  with pytest.raises(UserError, match="adapters served together share a base"):
    multi_adapter.stack_adapters([adapters[0], other])
  llu_like = type("LLUAdapter", (), {"method": "llu"})()
  with pytest.raises(UserError, match="only weight-space adapters"):
    multi_adapter.stack_adapters([adapters[0], llu_like])
  with pytest.raises(UserError, match="one of each per task"):
    multi_adapter.MultiAdapterClassifier.build(base, adapters, CLASS_NAMES[:1], [[TEMPLATE]])
