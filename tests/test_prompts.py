"""Packed class prompts: the layout, and text embeddings equal to those of each prompt alone."""

import jax
import numpy as np
import pytest

from clip_lora_jax import data, lora, model, prompts
from clip_lora_jax.tokenizer import load_tokenizer

TINY = model.get_config("tiny")


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


def mixed_prompt_ids(tokenizer) -> np.ndarray:
  """Prompts of 2 to 77 tokens (one truncated), in no particular order of length."""
  words = "a photo of a very small and remarkably detailed satellite image".split()
  texts = ["a photo of a cat.", "", "dog"] + [
      " ".join(words[i % len(words)] for i in range(n)) for n in (5, 40, 11, 90, 23, 3)]
  return prompts.class_prompt_ids(tokenizer, texts, "{}")


def test_packing_places_every_prompt_once_in_rows_of_the_row_length(tokenizer):
  ids = mixed_prompt_ids(tokenizer)
  lengths = np.argmax(ids, axis=-1) + 1
  assert lengths.max() == 77 and lengths.min() == 2
  packed = prompts.pack_prompts(ids, row_length=40, row_multiple=4)
  rows, length = packed.token_ids.shape
  assert length == 77 and rows % 4 == 0  # a prompt longer than the row length widens the rows
  covered = np.zeros(packed.token_ids.shape, bool)
  for c in range(len(ids)):
    row, end = int(packed.end_rows[c]), int(packed.end_cols[c])
    start = end - lengths[c] + 1
    np.testing.assert_array_equal(packed.token_ids[row, start:end + 1], ids[c, :lengths[c]])
    np.testing.assert_array_equal(packed.positions[row, start:end + 1], np.arange(lengths[c]))
    assert not covered[row, start:end + 1].any()
    covered[row, start:end + 1] = True
  assert (packed.token_ids[~covered] == 0).all() and (packed.positions[~covered] == 0).all()


def test_imagenet_prompts_fill_rows_of_64_almost_completely(tokenizer):
  names = data.get_dataset("imagenet").class_names
  ids = prompts.class_prompt_ids(tokenizer, names, "a photo of a {}.")
  lengths = np.argmax(ids, axis=-1) + 1
  packed = prompts.pack_prompts(ids)
  assert (lengths.min(), lengths.max(), lengths.sum()) == (8, 18, 9165)
  assert packed.token_ids.shape == (147, 64)  # 97% of the positions used; padded: 1,000 x 18


@pytest.mark.parametrize("with_adapter", [False, True])
def test_packed_embeddings_equal_one_prompt_per_row(tokenizer, with_adapter):
  params = model.init_params(jax.random.key(0), TINY)
  ids = mixed_prompt_ids(tokenizer)
  options = {}
  if with_adapter:
    lora_config = lora.LoRAConfig(matrices=("q", "k", "v", "o"))
    adapter = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(1), TINY, lora_config))
    options = dict(lora=adapter, lora_scale=lora_config.scale)
  packed = prompts.encode_packed(params, prompts.pack_prompts(ids, row_length=24), TINY, **options)
  # One prompt per row, padded to 77 (tests/test_text_truncation.py: each as if alone).
  padded = model.encode_texts(params, ids, TINY, **options)
  # fp32; only the blocking of the matmuls differs.
  np.testing.assert_allclose(packed, padded, rtol=0, atol=2e-6)
