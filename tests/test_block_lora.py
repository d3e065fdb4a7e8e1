"""Block-LoRA: both partitions against a dense block-matrix reference, n = 1 against LoRA,
parameter counts, the start at CLIP, adapter files and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_lora_jax import lora, model
from clip_lora_jax.methods import block_lora
from clip_lora_jax.errors import UserError

TINY = model.get_config("tiny")  # vision width 64, text width 48
IMAGES = jax.random.normal(jax.random.key(5), (3, 32, 32, 3))
IDS = jnp.array([[49406, 320, 1125, 539, 320, 2368, 49407, 0],
                 [49406, 320, 1125, 49407, 0, 0, 0, 0]])
SPLITS = [dict(split="input", blocks=4, rank=2), dict(split="rank", blocks=2, rank=4)]


@pytest.fixture(scope="module")
def params():
  return model.init_params(jax.random.key(0), TINY)


def trained(config: block_lora.BlockLoRAConfig, seed: int = 1) -> model.Params:
  """A Block-LoRA adapter with random non-zero factors (so that it changes the model)."""
  fresh = lora.init(jax.random.key(seed), TINY, config)
  leaves, treedef = jax.tree.flatten(fresh)
  keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves)])


def block_matrices(config: block_lora.BlockLoRAConfig, pair) -> tuple[jax.Array, jax.Array]:
  """The full (in, r) and (r, out) block matrices written out from the sub-matrices.

  input split: A = [A_s; A_s; ...] stacked over the n input chunks, B as is.
  rank split: A = [A_s, A_s, ...] side by side over the n rank blocks, B = [B_1; ...; B_n].
  """
  n = config.blocks
  if config.split == "input":
    return jnp.concatenate([pair["a"]] * n, axis=0), pair["b"]
  return jnp.concatenate([pair["a"]] * n, axis=1), jnp.concatenate(list(pair["b"]), axis=0)


def dense_reference(params, adapter, config):
  """Base params with scale * A @ B added to each adapted kernel, built from `block_matrices`."""
  out = jax.tree.map(lambda x: x, params)
  for tower, layer, matrix in lora.targets(TINY, config):
    pair = adapter[tower][f"layers_{layer}"]["attn"][matrix]
    a, b = block_matrices(config, pair)
    dense = out[tower][f"layers_{layer}"]["attn"][matrix]
    dense["kernel"] = dense["kernel"] + config.scale * a @ b
  return out


def embeddings(params, adapter=None, config=None):
  kwargs = {} if adapter is None else dict(lora=config.pairs(adapter), lora_scale=config.scale)
  return (model.encode_images(params, IMAGES, TINY, **kwargs),
          model.encode_texts(params, IDS, TINY, **kwargs))


# Compiled, for the comparisons with tolerances (the bitwise ones run `embeddings` as is).
compiled_embeddings = jax.jit(embeddings, static_argnames="config")


@pytest.mark.parametrize("split", SPLITS, ids=["input", "rank"])
def test_low_rank_path_merge_and_dense_reference_agree(params, split):
  config = block_lora.BlockLoRAConfig(**split)
  adapter = trained(config)
  ours = compiled_embeddings(params, adapter, config=config)
  merged = compiled_embeddings(lora.merge(params, adapter, config))
  dense = compiled_embeddings(dense_reference(params, adapter, config))
  base = compiled_embeddings(params)
  for o, m, d, b in zip(ours, merged, dense, base):
    assert np.abs(np.asarray(o - b)).max() > 1e-2  # the adapter does change the model
    np.testing.assert_allclose(o, m, atol=1e-5)
    np.testing.assert_allclose(o, d, atol=1e-5)
  restored = lora.unmerge(lora.merge(params, adapter, config), adapter, config)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("split", SPLITS, ids=["input", "rank"])
def test_gradients_equal_those_of_the_dense_block_reference(params, split):
  config = block_lora.BlockLoRAConfig(**split)
  adapter = trained(config)
  target = jax.random.normal(jax.random.key(9), (3, TINY.embed_dim))

  def loss(emb_fn):
    def f(adapter):
      images, texts = emb_fn(adapter)
      return jnp.sum((images - target) ** 2) + jnp.sum(jnp.sin(texts))
    return f

  ours = jax.grad(loss(lambda ad: compiled_embeddings(params, ad, config=config)))(adapter)
  dense = jax.grad(loss(lambda ad: compiled_embeddings(dense_reference(params, ad, config))))(
      adapter)
  for (path, g), d in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(dense)):
    assert np.abs(np.asarray(g)).max() > 0, path
    np.testing.assert_allclose(g, d, rtol=1e-4, atol=1e-5 * np.abs(np.asarray(d)).max(),
                               err_msg=jax.tree_util.keystr(path))
  if config.split == "rank":  # every B_i gets the same gradient (see the module docstring)
    for b in [x for p, x in jax.tree_util.tree_leaves_with_path(ours) if "'b'" in str(p)]:
      np.testing.assert_allclose(b[0], b[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("split", ["input", "rank"])
def test_one_block_is_exactly_lora(params, split):
  config = block_lora.BlockLoRAConfig(blocks=1, split=split, rank=2)
  plain = lora.LoRAConfig(rank=2)
  adapter = trained(config)
  pairs = config.pairs(adapter)
  fresh_block = lora.init(jax.random.key(3), TINY, config)
  fresh_lora = lora.init(jax.random.key(3), TINY, plain)
  for x, y in zip(jax.tree.leaves(config.pairs(fresh_block)), jax.tree.leaves(fresh_lora)):
    np.testing.assert_array_equal(x, y)
  for ours, theirs in zip(embeddings(params, adapter, config), embeddings(params, pairs, plain)):
    np.testing.assert_array_equal(ours, theirs)


def test_parameter_counts_match_the_formulas():
  config = model.get_config("ViT-B/16")
  count = lambda c: lora.num_parameters(
      jax.eval_shape(lambda k: lora.init(k, config, c), jax.random.key(0)))
  # 36 adapted projections per tower (q, k, v of 12 layers); widths 768 and 512.
  lora_formula = lambda r: 36 * r * (768 + 768) + 36 * r * (512 + 512)
  block_formula = lambda r, n: 36 * (r * 768 // n + r * 768) + 36 * (r * 512 // n + r * 512)
  assert count(lora.LoRAConfig()) == lora_formula(2) == 184_320
  for split, rank, blocks in [("input", 2, 8), ("input", 4, 4), ("rank", 4, 2), ("rank", 8, 8)]:
    c = block_lora.BlockLoRAConfig(split=split, rank=rank, blocks=blocks)
    assert count(c) == block_formula(rank, blocks), (split, rank, blocks)
  assert count(block_lora.BlockLoRAConfig()) == 103_680  # the default: input split, 8 blocks


@pytest.mark.parametrize("split", SPLITS, ids=["input", "rank"])
def test_a_fresh_adapter_is_exactly_clip(params, split):
  config = block_lora.BlockLoRAConfig(**split)
  fresh = lora.init(jax.random.key(0), TINY, config)
  for ours, base in zip(embeddings(params, fresh, config), embeddings(params)):
    np.testing.assert_array_equal(ours, base)


def test_adapter_file_round_trip(tmp_path, params):
  config = block_lora.BlockLoRAConfig(split="rank", blocks=2, rank=4, matrices=("q", "o"))
  adapter = lora.Adapter(trained(config), config, "tiny", TINY, lora.base_fingerprint(params))
  path = str(tmp_path / "adapter.safetensors")
  lora.save_adapter(path, adapter)
  loaded = lora.load_adapter(path)
  assert loaded.config == config and type(loaded.config) is block_lora.BlockLoRAConfig
  for x, y in zip(jax.tree.leaves(loaded.lora), jax.tree.leaves(adapter.lora)):
    np.testing.assert_array_equal(x, y)
  lora.check_compatible(loaded, "tiny", TINY, lora.base_fingerprint(params), config)
  with pytest.raises(UserError, match="differs from the requested"):
    lora.check_compatible(loaded, "tiny", TINY, lora.base_fingerprint(params),
                          lora.LoRAConfig(rank=4, matrices=("q", "o")))


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="columns"), "split"), (dict(blocks=0), "blocks"),
    (dict(split="rank", rank=2, blocks=4), "does not divide lora.rank"),
])
def test_bad_config_is_a_user_error(kwargs, message):
  with pytest.raises(UserError, match=message):
    block_lora.BlockLoRAConfig(**kwargs)


def test_blocks_must_divide_the_width():
  with pytest.raises(UserError, match="does not divide the tower width 64"):
    lora.init(jax.random.key(0), TINY, block_lora.BlockLoRAConfig(blocks=5))


def test_method_name_finds_the_config_class():
  assert lora.config_type("block_lora") is block_lora.BlockLoRAConfig
  assert lora.config_type("lora") is lora.LoRAConfig
  with pytest.raises(UserError, match="no weight-space adapter"):
    lora.config_type("lorax")
