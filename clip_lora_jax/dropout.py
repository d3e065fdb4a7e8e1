"""Dropout on the input of a low-rank branch: cheap exact masks and a backward that keeps no copy.

`dropped_down_projection(x, a, key, rate)` is `sum_input_chunks(dropout(x), rows(a)) @ a` with
dropout's usual semantics (each feature kept with probability 1 - rate, kept ones scaled by
1 / (1 - rate)). Two costs of the straightforward version are avoided:

* random bits: one threefry2x32 hash gives 64 bits, i.e. eight 8-bit decisions (`keep iff byte
  >= rate * 256`, exact when rate is a multiple of 1/256, as the reference's 0.25 is), where
  `jax.random.bernoulli` spends a whole hash on each element;
* memory: the backward regenerates the mask from the key and so saves only `x` (usually kept
  anyway), not the dropped copy of `x` and its mask.

Masks are a pure function of the key and of each element's index in the global array (counters
from iota, as JAX's partitionable threefry), so they do not depend on how `x` is sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p


def keep_mask_bits(rate: float) -> int:
  """The fewest bits (8, 16 or 32) per decision that represent `rate` exactly (32 otherwise:
  the keep probability is then exact to 2^-32)."""
  return next((bits for bits in (8, 16) if (rate * 2**bits).is_integer()), 32)


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index of every element of `shape` (built from per-axis iotas)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  if stride > 2**32:
    raise ValueError(f"a dropout mask of shape {shape} has more hash counters than 2^32")
  return index


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean mask of `shape`, each element True with probability 1 - rate (see module doc)."""
  bits = keep_mask_bits(rate)
  per_hash = 64 // bits
  words = -(-shape[-1] // per_hash)
  k1, k2 = jax.random.bits(key, (2,), jnp.uint32)
  counters = _linear_index((*shape[:-1], words))
  hashed = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counters), counters)
  draws = lax.bitcast_convert_type(jnp.concatenate(hashed, axis=-1), jnp.dtype(f"uint{bits}"))
  draws = draws.reshape(*shape[:-1], -1)[..., :shape[-1]]
  return draws >= np.array(round(rate * 2**bits), draws.dtype)


def sum_input_chunks(x: jax.Array, rows: int) -> jax.Array:
  """x of width n * rows -> the sum of its n consecutive chunks of `rows` features.

  `x @ tile(a, (n, 1)) == sum_input_chunks(x, a.shape[0]) @ a`: a down-projection shared by the
  n input chunks (Block-LoRA's input split) costs additions instead of n products.
  """
  width = x.shape[-1]
  if width == rows:
    return x
  if width % rows:
    raise ValueError(f"a low-rank factor with {rows} rows cannot read {width} input features")
  return x.reshape(*x.shape[:-1], width // rows, rows).sum(axis=-2)


def _dropped(x: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
  return jnp.where(mask, x * jnp.asarray(1 / (1 - rate), x.dtype), jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dropped_down_projection(x: jax.Array, a: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """`sum_input_chunks(dropout(x, rate), a.shape[0]) @ a` with the mask drawn from `key`."""
  return jnp.dot(sum_input_chunks(_dropped(x, keep_mask(key, x.shape, rate), rate), a.shape[0]),
                 a)


def _forward(x, a, key, rate):
  return dropped_down_projection(x, a, key, rate), (x, a, key)


def _backward(rate, residuals, g):
  x, a, key = residuals
  mask = keep_mask(key, x.shape, rate)  # One mask for both gradients.
  dropped = sum_input_chunks(_dropped(x, mask, rate), a.shape[0])
  grad_a = jnp.dot(dropped.reshape(-1, a.shape[0]).T, g.reshape(-1, a.shape[1])).astype(a.dtype)
  grad_chunk = jnp.dot(g, a.T)
  grad_dropped = jnp.tile(grad_chunk, (1,) * (x.ndim - 1) + (x.shape[-1] // a.shape[0],))
  grad_x = _dropped(grad_dropped, mask, rate).astype(x.dtype)
  return grad_x, grad_a, np.zeros(np.shape(key), jax.dtypes.float0)


dropped_down_projection.defvjp(_forward, _backward)
