"""The low-rank branch's dropout: exact keep rate, scaling, determinism and its custom backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_lora_jax import dropout


@pytest.mark.parametrize("rate, bits", [(0.25, 8), (0.5, 8), (1 / 1024, 16), (0.1, 32)])
def test_mask_bits_are_the_fewest_that_hold_the_rate_exactly(rate, bits):
  assert dropout.keep_mask_bits(rate) == bits


@pytest.mark.parametrize("rate", [0.25, 0.1])
def test_keep_mask_rate_determinism_and_independence(rate):
  shape = (64, 197, 770)  # A width that is not a multiple of the decisions per hash.
  mask = np.asarray(dropout.keep_mask(jax.random.key(0), shape, rate))
  n = mask.size
  # Kept fraction within 5 standard deviations of 1 - rate.
  assert abs(mask.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  # No structure along the feature axis (bytes of one hash) nor along rows.
  for axis in (0, 1, 2):
    assert np.abs(mask.mean(axis=tuple(i for i in range(3) if i != axis)) - (1 - rate)).max() < 0.02
  # Neighbouring decisions (same hash, next hash) are uncorrelated.
  flat = mask.reshape(-1).astype(np.float64)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01
  np.testing.assert_array_equal(mask, dropout.keep_mask(jax.random.key(0), shape, rate))
  assert (mask != np.asarray(dropout.keep_mask(jax.random.key(1), shape, rate))).mean() > 0.1


def test_keep_mask_is_the_same_inside_jit_and_for_raw_keys():
  shape = (3, 5, 48)
  eager = dropout.keep_mask(jax.random.PRNGKey(7), shape, 0.25)
  jitted = jax.jit(lambda k: dropout.keep_mask(k, shape, 0.25))(jax.random.PRNGKey(7))
  np.testing.assert_array_equal(eager, jitted)


def _reference(x, a, key, rate):
  """The branch input as plain autodiff sees it, with the same mask."""
  mask = dropout.keep_mask(key, x.shape, rate)
  return dropout.sum_input_chunks(jnp.where(mask, x / (1 - rate), 0), a.shape[0]) @ a


@pytest.mark.parametrize("rows", [24, 8])  # Plain LoRA; an `a` shared by 3 input chunks.
def test_dropped_down_projection_values_scaling_and_gradients(rows):
  kx, ka, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 7, 24))
  a = jax.random.normal(ka, (rows, 3))
  g = jax.random.normal(kg, (2, 7, 3))
  key, rate = jax.random.key(11), 0.25

  out = dropout.dropped_down_projection(x, a, key, rate)
  np.testing.assert_allclose(out, _reference(x, a, key, rate), rtol=1e-6, atol=1e-6)
  # Dropped features are zero, kept ones scaled by 1 / (1 - rate).
  ones = dropout.dropped_down_projection(jnp.ones((1, 1, 24)), jnp.eye(24), key, rate)
  assert set(np.unique(np.asarray(ones)).tolist()) <= {0.0, float(np.float32(4 / 3))}

  grads = jax.grad(lambda x, a: jnp.vdot(dropout.dropped_down_projection(x, a, key, rate), g),
                   argnums=(0, 1))(x, a)
  expected = jax.grad(lambda x, a: jnp.vdot(_reference(x, a, key, rate), g), argnums=(0, 1))(x, a)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
