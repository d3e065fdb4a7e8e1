"""Learned prompt tokens in both towers (`model.Prompts`: CoOp's context, MaPLe's deep prompts)
against a hand-built reference: the same blocks applied one by one in a Python loop, the prompt
tokens written into the embedding sequence by hand. CPU, float32; embeddings and gradients agree
to 1e-5 (absolute, on values of order 1; the scans and the packed layout only reorder sums),
gradients to 1e-3 of their largest entry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_lora_jax import evaluation, model, prompts
from clip_lora_jax.tokenizer import load_tokenizer

# `tiny` with 3 blocks per tower (patches of 16): plain, prompted and pooled blocks all occur.
TINY = model.get_config("tiny")
CONFIG = dataclasses.replace(TINY, vision=dataclasses.replace(TINY.vision, layers=3, patch_size=16),
                             text=dataclasses.replace(TINY.text, layers=3))
ATOL = 1e-5
NAMES = ["cat", "sea or lake", "annual crop land", "a"]


@pytest.fixture(scope="module")
def params():
  return model.init_params(jax.random.key(0), CONFIG)


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


def block(i, tower, x, params, causal):
  cfg = CONFIG.tower(tower)
  return model.ResidualBlock(cfg.heads, cfg.mlp_dim, causal, model.Runtime()).apply(
      {"params": params[tower][f"layers_{i}"]}, x)


def layer_norm(x, p):
  return model.nn.LayerNorm(1e-5).apply({"params": p}, x)


@jax.jit
def reference_text(params, ids, tokens, deep=None):
  """Prompt embeddings: token embeddings with `tokens` written at positions 1..n, blocks one by
  one (deep prompt j written at positions 1..n before block j + 1), pooled at the end token."""
  p, n = params["text"], tokens.shape[0]
  x = p["token_embedding"]["embedding"][ids]
  x = x.at[:, 1:1 + n].set(tokens)
  x = x + p["position_embedding"][:ids.shape[1]]
  for i in range(CONFIG.text.layers):
    if deep is not None and 1 <= i <= len(deep):
      x = x.at[:, 1:1 + n].set(deep[i - 1])
    x = block(i, "text", x, params, causal=True)
  x = layer_norm(x[jnp.arange(len(ids)), jnp.argmax(ids, -1)], p["ln_final"])
  return x @ params["text_projection"]["kernel"]


@jax.jit
def reference_image(params, images, tokens, deep=None):
  """Image embeddings: patches, class token, positions, `tokens` appended, ln_pre, blocks one by
  one (deep prompt j written over the last n tokens before block j + 1), ln_post on the class
  token."""
  p, cfg, n = params["vision"], CONFIG.vision, tokens.shape[0]
  grid, size = cfg.image_size // cfg.patch_size, cfg.patch_size
  patches = images.reshape(len(images), grid, size, grid, size, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(len(images), grid * grid, -1) @ p["patch_embedding"]["kernel"].reshape(
      -1, cfg.width)
  cls = jnp.broadcast_to(p["class_embedding"], (len(images), 1, cfg.width))
  x = jnp.concatenate([cls, x], 1) + p["position_embedding"]
  x = jnp.concatenate([x, jnp.broadcast_to(tokens, (len(images), n, cfg.width))], 1)
  x = layer_norm(x, p["ln_pre"])
  for i in range(cfg.layers):
    if deep is not None and 1 <= i <= len(deep):
      x = x.at[:, -n:].set(deep[i - 1])
    x = block(i, "vision", x, params, causal=False)
  return layer_norm(x[:, 0], p["ln_post"]) @ params["visual_projection"]["kernel"]


def coop_ids(tokenizer, n):
  """CoOp's prompts "X X ... X {name}." with n placeholders."""
  return prompts.class_prompt_ids(tokenizer, NAMES, " ".join(["X"] * n) + " {}.")


def random(key, *shape):
  return 0.02 * jax.random.normal(jax.random.key(key), shape)


def test_context_tokens_equal_the_reference_plain_and_packed(params, tokenizer):
  ids = coop_ids(tokenizer, 4)
  ctx = random(1, 4, CONFIG.text.width)
  expected = reference_text(params, jnp.asarray(ids), ctx)
  plain = model.encode_texts(params, ids, CONFIG, prompts=model.Prompts(ctx))
  packed = prompts.encode_packed(params, prompts.pack_prompts(ids), CONFIG,
                                 prompts=model.Prompts(ctx))
  np.testing.assert_allclose(plain, expected, rtol=0, atol=ATOL)
  np.testing.assert_allclose(packed, expected, rtol=0, atol=ATOL)
  assert not np.allclose(packed, model.encode_texts(params, ids, CONFIG), atol=1e-3)

  # Gradients of the context, through the packed layout, against those of the reference.
  weights = random(2, len(NAMES), CONFIG.embed_dim)
  packed = prompts.pack_prompts(ids)
  grad = jax.jit(jax.grad(lambda c: jnp.sum(weights * prompts.encode_packed(
      params, packed, CONFIG, prompts=model.Prompts(c)))))(ctx)
  expected_grad = jax.jit(jax.grad(
      lambda c: jnp.sum(weights * reference_text(params, ids, c))))(ctx)
  assert_close_gradients(grad, expected_grad)


def assert_close_gradients(got, want):
  """Equal to 1e-3 of the largest entry, with a gradient for every prompt layer."""
  scale = np.abs(want).reshape(-1, want.shape[-2] * want.shape[-1]).max(axis=-1)
  assert (scale > 0).all()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale.max())


def test_the_template_own_embeddings_as_context_give_zero_shot_clip(params, tokenizer):
  template = "a photo of a {}."
  own = params["text"]["token_embedding"]["embedding"][tokenizer(["a photo of a"])[0, 1:5]]
  ids = prompts.class_prompt_ids(tokenizer, NAMES, template)
  coop = model.normalize(prompts.encode_packed(params, prompts.pack_prompts(ids), CONFIG,
                                               prompts=model.Prompts(own)))
  clip = evaluation.zero_shot_classifier(params, CONFIG, tokenizer, NAMES, (template,))
  np.testing.assert_allclose(coop, clip, rtol=0, atol=1e-6)


def test_deep_prompts_equal_the_reference_in_both_towers(params, tokenizer):
  n, depth = 2, 2  # of blocks 0, 1 and 2 (pooling), block 1 prompted
  ids = jnp.asarray(prompts.class_prompt_ids(tokenizer, NAMES, "X X of a {}."))
  images = jax.random.normal(jax.random.key(3), (3, 32, 32, 3))
  text = {"tokens": random(4, n, CONFIG.text.width),
          "deep": random(5, depth - 1, n, CONFIG.text.width)}
  vision = {"tokens": random(6, n, CONFIG.vision.width),
            "deep": random(7, depth - 1, n, CONFIG.vision.width)}
  packed = prompts.pack_prompts(np.asarray(ids))
  ours_text = lambda t: prompts.encode_packed(params, packed, CONFIG, prompts=model.Prompts(**t))
  ours_image = lambda v: model.encode_images(params, images, CONFIG, prompts=model.Prompts(**v))
  ref_text = lambda t: reference_text(params, ids, t["tokens"], t["deep"])
  ref_image = lambda v: reference_image(params, images, v["tokens"], v["deep"])
  np.testing.assert_allclose(ours_text(text), ref_text(text), rtol=0, atol=ATOL)
  np.testing.assert_allclose(ours_image(vision), ref_image(vision), rtol=0, atol=ATOL)

  weights_t = random(8, len(NAMES), CONFIG.embed_dim)
  weights_v = random(9, len(images), CONFIG.embed_dim)
  loss = lambda text_fn, image_fn: lambda t, v: (jnp.sum(weights_t * text_fn(t))
                                                 + jnp.sum(weights_v * image_fn(v)))
  grads = jax.jit(jax.grad(loss(ours_text, ours_image), argnums=(0, 1)))(text, vision)
  expected = jax.jit(jax.grad(loss(ref_text, ref_image), argnums=(0, 1)))(text, vision)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    assert_close_gradients(got, want)

  # Deep prompts down to the last (pooling) block.
  deepest = {**vision, "deep": random(10, 2, n, CONFIG.vision.width)}
  np.testing.assert_allclose(ours_image(deepest), ref_image(deepest), rtol=0, atol=ATOL)


def test_more_deep_prompts_than_blocks_are_refused(params):
  images = jnp.zeros((1, 32, 32, 3))
  too_deep = model.Prompts(jnp.zeros((2, 64)), jnp.zeros((3, 2, 64)))
  with pytest.raises(ValueError, match="3 deep prompt layers for a tower of 3 blocks"):
    model.encode_images(params, images, CONFIG, prompts=too_deep)
