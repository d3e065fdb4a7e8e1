"""Exact text truncation: the causal text tower pooled at the end token gives the same output on
the shortest context covering every prompt as on the full 77 positions."""

import jax
import jax.numpy as jnp
import numpy as np

from clip_lora_jax import model
from clip_lora_jax.tokenizer import load_tokenizer

TINY = model.get_config("tiny")
encode = jax.jit(lambda params, ids: model.encode_texts(params, ids, TINY))  # one compile / length


def test_trimmed_and_full_context_text_encodings_are_equal():
  tokenizer = load_tokenizer()
  words = "a photo of a very small and remarkably detailed satellite image".split()
  prompts = ["", "cat", "a photo of a cat."] + \
      [" ".join(words[i % len(words)] for i in range(n)) for n in (5, 11, 23, 40, 74, 75, 90, 200)]
  ids = tokenizer(prompts)
  ends = np.argmax(ids, axis=-1)
  assert ends.max() == 76 and (ids[:, -1] == 49407).sum() >= 2  # Full and truncated prompts.
  params = model.init_params(jax.random.key(0), TINY)
  full = encode(params, jnp.asarray(ids))
  # Every prompt alone on its shortest bucket, and all together (bucket 77).
  for row in range(len(prompts)):
    trimmed = model.trim_token_ids(ids[row:row + 1])
    assert trimmed.shape[1] == min(77, -(-(ends[row] + 1) // 8) * 8)
    # fp32: only the blocking of the matmuls changes with the context length.
    np.testing.assert_allclose(encode(params, jnp.asarray(trimmed)),
                               full[row:row + 1], rtol=0, atol=2e-6)
  short = ids[ends < 20]
  assert model.trim_token_ids(short).shape[1] == -(-(ends[ends < 20].max() + 1) // 8) * 8
  np.testing.assert_allclose(
      encode(params, jnp.asarray(model.trim_token_ids(short))),
      full[ends < 20], rtol=0, atol=2e-6)
