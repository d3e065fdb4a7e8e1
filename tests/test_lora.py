"""LoRA: init, layer sets, merge / unmerge, the (x a) b branch and its gradients, adapter files."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_lora_jax import lora, model
from clip_lora_jax.errors import UserError

TINY = model.get_config("tiny")


@pytest.fixture(scope="module")
def tiny_params():
  return model.init_params(jax.random.key(0), TINY)


def random_adapter(config: model.CLIPConfig, lora_config: lora.LoRAConfig, seed: int = 1):
  """An adapter with non-zero b, so that it changes the model."""
  fresh = lora.init(jax.random.key(seed), config, lora_config)
  leaves, treedef = jax.tree.flatten(fresh)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * 0.2
                                      for k, x in zip(keys, leaves)])


def test_reference_parameter_count_and_init():
  config = model.get_config("ViT-B/16")
  adapter = lora.init(jax.random.key(0), config, lora.LoRAConfig())
  # q, k, v of 12 + 12 layers at rank 2: 12 * 3 * 2 * (2 * 768) + 12 * 3 * 2 * (2 * 512).
  assert lora.num_parameters(adapter) == 184_320
  pair = adapter["vision"]["layers_0"]["attn"]["q"]
  assert pair["a"].shape == (768, 2) and pair["b"].shape == (2, 768)
  assert not np.any(pair["b"])
  bound = 1 / np.sqrt(768)  # torch kaiming_uniform_(a=sqrt(5)) on a (r, in) weight.
  a = np.concatenate([np.ravel(adapter["vision"][f"layers_{i}"]["attn"][m]["a"])
                      for i in range(12) for m in "qkv"])
  assert np.abs(a).max() <= bound
  assert abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound
  assert set(adapter) == {"vision", "text"}
  assert set(adapter["text"]["layers_11"]["attn"]) == {"q", "k", "v"}


def test_scale_is_alpha_over_sqrt_rank_by_default():
  assert lora.LoRAConfig(rank=4, alpha=2).scale == pytest.approx(1.0)
  assert lora.LoRAConfig(rank=4, alpha=2, scaling="linear").scale == pytest.approx(0.5)
  assert lora.LoRAConfig().scale == pytest.approx(1 / np.sqrt(2))


@pytest.mark.parametrize("layers,depth,expected", [
    ("all", 12, tuple(range(12))), ("bottom", 12, (0, 1, 2, 3)), ("mid", 12, (4, 5, 6, 7)),
    ("up", 12, (8, 9, 10, 11)), ("half-bottom", 12, (0, 1, 2, 3, 4, 5)),
    ("half-up", 12, (6, 7, 8, 9, 10, 11)), ("top", 12, (11,)), ("top3", 12, (9, 10, 11)),
    ("half-bottom", 24, tuple(range(12))), ("half-up", 24, tuple(range(12, 24))),
    ("all", 24, tuple(range(24))), ((3, 1, 3), 12, (1, 3)),
])
def test_layer_sets(layers, depth, expected):
  assert lora.layer_indices(layers, depth) == expected


def test_targets_follow_config():
  config = model.get_config("tiny-12")
  chosen = lora.targets(config, lora.LoRAConfig(encoders="vision", matrices=("q", "o"),
                                                layers="top3"))
  assert chosen == [("vision", l, m) for l in (9, 10, 11) for m in ("q", "o")]
  adapter = lora.init(jax.random.key(0), config, lora.LoRAConfig(encoders="text", layers=(0,)))
  assert list(adapter) == ["text"] and list(adapter["text"]) == ["layers_0"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(matrices=("q", "x")), "matrices"),
    (dict(layers="middle"), "layers"), (dict(encoders="audio"), "encoders"),
    (dict(scaling="log"), "scaling"), (dict(dropout=1.5), "dropout"),
])
def test_bad_lora_config_is_a_user_error(kwargs, message):
  with pytest.raises(UserError, match=message):
    lora.LoRAConfig(**kwargs)


def test_bad_layer_indices_and_depth():
  with pytest.raises(UserError, match=r"\[0, 11\]"):
    lora.layer_indices((12,), 12)
  with pytest.raises(UserError, match="12-layer towers only"):
    lora.layer_indices("top3", 24)


def test_layer_lists_as_the_command_line_gives_them():
  assert lora.LoRAConfig.from_dict({"layers": "0,1"}).layers == (0, 1)
  assert lora.LoRAConfig.from_dict({"layers": "3"}).layers == (3,)
  assert lora.LoRAConfig.from_dict({"layers": "half-up"}).layers == "half-up"
  with pytest.raises(UserError, match="layer indices such as 0,1,2"):
    lora.LoRAConfig.from_dict({"layers": "0,x"})
  # A set a 2-layer tower lacks is refused before anything is allocated.
  with pytest.raises(UserError, match=r"\[0, 1\] for a 2-layer tower"):
    lora.abstract_init(TINY, lora.LoRAConfig.from_dict({"layers": "0,5"}))
  with pytest.raises(UserError, match="12-layer towers only"):
    lora.abstract_init(TINY, lora.LoRAConfig(layers="mid"))


def test_zero_b_adapter_is_exactly_the_base_model(tiny_params):
  adapter = lora.init(jax.random.key(3), TINY, lora.LoRAConfig(matrices=("q", "k", "v", "o")))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ids = jnp.zeros((3, 10), jnp.int32).at[:, 0].set(49406).at[:, 4].set(49407)
  for fn, x in ((model.encode_images, images), (model.encode_texts, ids)):
    plain = fn(tiny_params, x, TINY)
    adapted = fn(tiny_params, x, TINY, lora=adapter, lora_scale=0.7)
    np.testing.assert_array_equal(plain, adapted)


def test_merge_unmerge_and_merged_forward(tiny_params):
  lora_config = lora.LoRAConfig(matrices=("q", "k", "v", "o"), rank=4, alpha=3.0)
  adapter = random_adapter(TINY, lora_config)
  merged = lora.merge(tiny_params, adapter, lora_config)
  # Untouched leaves are the same arrays; touched kernels changed.
  assert merged["vision"]["layers_0"]["mlp"]["fc1"]["kernel"] is \
      tiny_params["vision"]["layers_0"]["mlp"]["fc1"]["kernel"]
  assert not np.allclose(merged["text"]["layers_1"]["attn"]["o"]["kernel"],
                         tiny_params["text"]["layers_1"]["attn"]["o"]["kernel"])
  # merge then unmerge: the base again, to fp32 rounding of (W + D) - D.
  restored = lora.unmerge(merged, adapter, lora_config)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tiny_params)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # The merged forward equals the low-rank forward (fp32: max abs difference <= 1e-5).
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  ids = jnp.zeros((3, 16), jnp.int32).at[:, 0].set(49406).at[:, 6:9].set(
      jnp.array([320, 1125, 539])).at[:, 9].set(49407)
  unmerged = model.logits(tiny_params, images, ids, TINY, lora=adapter, lora_scale=lora_config.scale)
  np.testing.assert_allclose(model.logits(merged, images, ids, TINY), unmerged, rtol=0, atol=1e-4)
  for fn, x in ((model.encode_images, images), (model.encode_texts, ids)):
    np.testing.assert_allclose(
        fn(merged, x, TINY), fn(tiny_params, x, TINY, lora=adapter, lora_scale=lora_config.scale),
        rtol=0, atol=1e-5)


def test_low_rank_branch_and_gradients_match_hand_derivation():
  """y = x W + c + s (x a) b; for L = sum(y * g): dL/da = s x^T (g b^T), dL/db = s (x a)^T g."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 7, 6)).astype(np.float32)
  w, c = rng.normal(size=(6, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32)
  a, b = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
  g = rng.normal(size=(5, 7, 6)).astype(np.float32)
  s = 0.37
  dense = model.Dense(6, runtime=model.Runtime(lora_scale=s))

  def loss(pair):
    y = dense.apply({"params": {"kernel": w, "bias": c}, "lora": pair}, x)
    return jnp.sum(y * g), y

  (value, y), grads = jax.value_and_grad(loss, has_aux=True)({"a": a, "b": b})
  x64, g64 = x.reshape(-1, 6).astype(np.float64), g.reshape(-1, 6).astype(np.float64)
  np.testing.assert_allclose(y.reshape(-1, 6), x64 @ w + c + s * (x64 @ a) @ b, atol=1e-4)
  np.testing.assert_allclose(grads["a"], s * x64.T @ (g64 @ b.T), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads["b"], s * (x64 @ a).T @ g64, rtol=1e-5, atol=1e-4)


def test_dropout_only_in_training_and_only_on_the_branch(tiny_params):
  lora_config = lora.LoRAConfig(dropout=0.25)
  adapter = random_adapter(TINY, lora_config)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  kwargs = dict(lora=adapter, lora_scale=lora_config.scale, lora_dropout=0.25)
  eval_a = model.encode_images(tiny_params, images, TINY, **kwargs)
  eval_b = model.encode_images(tiny_params, images, TINY, **kwargs)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_1 = model.encode_images(tiny_params, images, TINY, dropout_rng=jax.random.key(5), **kwargs)
  train_2 = model.encode_images(tiny_params, images, TINY, dropout_rng=jax.random.key(5), **kwargs)
  train_3 = model.encode_images(tiny_params, images, TINY, dropout_rng=jax.random.key(6), **kwargs)
  np.testing.assert_array_equal(train_1, train_2)  # Same seed, same result.
  assert not np.allclose(train_1, train_3)
  # With a zero branch, dropout has nothing to act on: the base output, exactly.
  zero = lora.init(jax.random.key(0), TINY, lora_config)
  np.testing.assert_array_equal(
      model.encode_images(tiny_params, images, TINY, lora=zero, lora_dropout=0.25,
                          dropout_rng=jax.random.key(5)),
      model.encode_images(tiny_params, images, TINY))


def test_adapter_file_round_trip_size_and_switching(tmp_path, tiny_params):
  config = model.get_config("ViT-B/16")
  lora_config = lora.LoRAConfig()
  adapter = lora.Adapter(random_adapter(config, lora_config), lora_config, "openai/clip-vit-base-patch16",
                         config, "0123456789abcdef")
  path = os.path.join(tmp_path, "adapter.safetensors")
  lora.save_adapter(path, adapter)
  assert os.path.getsize(path) < 1_000_000  # 184,320 fp32 values + metadata.
  assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
  loaded = lora.load_adapter(path)
  assert loaded.config == lora_config and loaded.base_config == config
  assert loaded.base_name == adapter.base_name and loaded.base_fingerprint == "0123456789abcdef"
  assert loaded.few_shot is None  # recorded by training runs only
  assert loaded.template is None  # files that record no prompt template
  lora.save_adapter(path, dataclasses.replace(adapter, template="a photo of a {}, a texture."))
  assert lora.load_adapter(path).template == "a photo of a {}, a texture."
  for got, want in zip(jax.tree.leaves(loaded.lora), jax.tree.leaves(adapter.lora)):
    np.testing.assert_array_equal(got, want)

  # Two task adapters on one loaded base, switched without reloading it.
  tiny_config = lora.LoRAConfig(rank=1)
  task_a = random_adapter(TINY, tiny_config, seed=1)
  task_b = random_adapter(TINY, tiny_config, seed=2)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  out_a = model.encode_images(lora.merge(tiny_params, task_a, tiny_config), images, TINY)
  out_b = model.encode_images(lora.merge(tiny_params, task_b, tiny_config), images, TINY)
  assert not np.allclose(out_a, out_b)
  np.testing.assert_array_equal(
      out_a, model.encode_images(lora.merge(tiny_params, task_a, tiny_config), images, TINY))


def test_adapter_for_another_base_or_rank_is_refused(tmp_path, tiny_params):
  lora_config = lora.LoRAConfig()
  fingerprint = lora.base_fingerprint(tiny_params)
  adapter = lora.Adapter(lora.init(jax.random.key(0), TINY, lora_config), lora_config, "tiny",
                         TINY, fingerprint)
  lora.check_compatible(adapter, "tiny", TINY, fingerprint, lora_config)
  with pytest.raises(UserError, match="architecture"):
    lora.check_compatible(adapter, "ViT-B/16", model.get_config("ViT-B/16"), fingerprint)
  other = lora.base_fingerprint(model.init_params(jax.random.key(9), TINY))
  with pytest.raises(UserError, match="other weights"):
    lora.check_compatible(adapter, "tiny", TINY, other)
  with pytest.raises(UserError, match="rank=4"):
    lora.check_compatible(adapter, "tiny", TINY, fingerprint, lora.LoRAConfig(rank=4))
  # A file whose tensors do not fit its declared config names the entry and both shapes.
  path = os.path.join(tmp_path, "bad.safetensors")
  wrong = lora.init(jax.random.key(0), TINY, lora.LoRAConfig(rank=3))
  lora.save_adapter(path, lora.Adapter(wrong, lora_config, "tiny", TINY, fingerprint))
  with pytest.raises(UserError, match=r"text.layers_0.attn.k.a.*shape \(48, 3\) where \(48, 2\)"):
    lora.load_adapter(path)
  with pytest.raises(UserError, match="does not exist"):
    lora.load_adapter(os.path.join(tmp_path, "missing.safetensors"))
