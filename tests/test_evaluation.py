"""Zero-shot classifiers (single template and ensembles) and masked top-1 / top-5 counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_lora_jax import evaluation, model
from clip_lora_jax.tokenizer import load_tokenizer

TINY = model.get_config("tiny")


@pytest.fixture(scope="module")
def params():
  return model.init_params(jax.random.key(0), TINY)


def test_template_ensemble_is_the_renormalised_mean_of_normalised_prompts(params):
  tokenizer = load_tokenizer()
  names, templates = ["cat", "forest", "sea or lake"], ["a photo of a {}.", "{} texture.", "art of {}"]
  classifier = evaluation.zero_shot_classifier(params, TINY, tokenizer, names, templates)
  ids = tokenizer([t.format(n) for n in names for t in templates])
  emb = np.asarray(model.normalize(model.encode_texts(params, jnp.asarray(ids), TINY)))
  mean = emb.reshape(3, 3, -1).mean(axis=1)
  expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  np.testing.assert_allclose(classifier, expected, rtol=0, atol=1e-6)
  single = evaluation.zero_shot_classifier(params, TINY, tokenizer, names, templates[:1])
  np.testing.assert_allclose(single, emb[::3], rtol=0, atol=1e-6)


def test_evaluate_counts_top1_top5_and_ignores_padding(params):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(10, 32, 32, 3)).astype(np.float32)
  classifier = model.normalize(jax.random.normal(jax.random.key(1), (7, TINY.embed_dim)))
  logits = np.asarray(model.normalize(model.encode_images(params, jnp.asarray(images), TINY))
                      @ classifier.T)
  order = np.argsort(-logits, axis=-1)
  labels = np.array([order[i, 0] if i < 4 else order[i, 3] if i < 7 else order[i, 6]
                     for i in range(10)], np.int32)  # 4 top-1 hits, 7 top-5 hits.
  # Two batches of 6: the second padded with 2 masked rows that would be hits.
  pad_images = np.concatenate([images, images[:2]])
  pad_labels = np.concatenate([labels, order[:2, 0].astype(np.int32)])
  mask = np.array([1] * 10 + [0] * 2, np.int32)
  batches = [{"image": pad_images[i:i + 6], "label": pad_labels[i:i + 6], "mask": mask[i:i + 6]}
             for i in (0, 6)]
  result = evaluation.evaluate(evaluation.clip_logits_fn(params, TINY, classifier), batches,
                               progress=False)
  assert result == {"top1": pytest.approx(40.0), "top5": pytest.approx(70.0), "count": 10}
