"""LLU: locality of the update, its value at anchors, training on synthetic features, clustering."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.cluster.hierarchy

from clip_lora_jax.methods import llu
from clip_lora_jax.errors import UserError

DEFAULT = llu.LLUConfig()
# The weight of an embedding at distance 1 from every anchor: 0.5 * e^-10 ~ 2.3e-5.
FAR_WEIGHT = DEFAULT.gamma * math.exp(DEFAULT.lam)
# A unit embedding blended with weight w moves by at most 4 w (2 w before, 2 w in the
# renormalisation); a logit scale * cos(i, t) by at most scale * (|di| + |dt|).
FAR_LOGIT_TOL = 100.0 * 2 * 4 * FAR_WEIGHT


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _zero_shot(image: np.ndarray, text: np.ndarray, scale: float = 100.0) -> np.ndarray:
  return scale * _unit(np.asarray(image, np.float64)) @ _unit(np.asarray(text, np.float64)).T


def _random_params(rng: np.random.Generator, dim: int, config: llu.LLUConfig) -> dict:
  """Far from the identity: the update visibly moves every embedding it applies to."""
  return {m: {"w": jnp.asarray(rng.standard_normal((dim, dim)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(dim), jnp.float32)}
          for m in config.adapted}


def _expected_update(p: dict, e: np.ndarray, w: float) -> np.ndarray:
  """normalise(w normalise(W e + b) + (1 - w) e) in float64, e normalised."""
  e = _unit(np.asarray(e, np.float64))
  f = _unit(e @ np.asarray(p["w"], np.float64).T + np.asarray(p["b"], np.float64))
  return _unit(w * f + (1 - w) * e)


def _samples(rng: np.random.Generator, centres: np.ndarray, per_class: int, noise: float,
             basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Unit samples around each centre (noise of norm ~ `noise`, inside span(basis) if given)."""
  labels = np.repeat(np.arange(len(centres)), per_class)
  basis = np.eye(centres.shape[1]) if basis is None else basis
  eps = rng.standard_normal((len(labels), basis.shape[0])) @ basis / math.sqrt(basis.shape[0])
  return _unit(centres[labels] + noise * eps).astype(np.float32), labels


@functools.partial(jax.jit, static_argnames="config")
def _train(params, image, labels, text, anchors, config: llu.LLUConfig):
  """300 full-batch AdamW steps (learning rate 1e-3, configs/llu.py's) on llu.loss."""
  optimizer = optax.adamw(1e-3, weight_decay=0.0)

  def step(_, carry):
    params, opt_state = carry
    grads = jax.grad(lambda p: llu.loss(p, image, labels, text, anchors, config)[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.lax.fori_loop(0, 300, step, (params, optimizer.init(params)))[0]


def test_identity_init_gives_zero_shot_logits_whatever_the_anchors():
  rng = np.random.default_rng(0)
  image, text = rng.standard_normal((6, 16)), rng.standard_normal((4, 16))
  # Half the embeddings are anchors themselves (full weight), the rest are not.
  anchors = {"image": np.concatenate([image[:3], rng.standard_normal((5, 16))]),
             "text": np.concatenate([text[:2], rng.standard_normal((3, 16))])}
  for mode in llu.MODES:
    config = llu.LLUConfig(mode=mode)
    params = llu.init(16, config)
    got = llu.logits(params, image.astype(np.float32), text.astype(np.float32),
                     anchors, config, scale=1.0)
    np.testing.assert_allclose(got, _zero_shot(image, text, scale=1.0), rtol=0, atol=1e-6)


def test_far_embeddings_keep_their_zero_shot_logits():
  rng = np.random.default_rng(1)
  # Anchors span the first 8 dimensions, the evaluated embeddings the last 8: cos = 0, d = 1.
  anchors = {m: np.pad(rng.standard_normal((5, 8)), ((0, 0), (0, 8))) for m in ("image", "text")}
  image = np.pad(rng.standard_normal((7, 8)), ((0, 0), (8, 0))).astype(np.float32)
  text = np.pad(rng.standard_normal((4, 8)), ((0, 0), (8, 0))).astype(np.float32)
  params = _random_params(rng, 16, DEFAULT)

  np.testing.assert_allclose(llu.locality_weight(image, anchors["image"], DEFAULT),
                             FAR_WEIGHT, rtol=1e-6)
  got = llu.logits(params, image, text, anchors, DEFAULT)
  np.testing.assert_allclose(got, _zero_shot(image, text), rtol=0, atol=FAR_LOGIT_TOL)
  # A negative similarity is clamped to 0: d = 1 as well.
  a = anchors["image"][:1]
  np.testing.assert_allclose(llu.locality_weight(-a, a, DEFAULT), FAR_WEIGHT, rtol=1e-6)


def test_update_applies_fully_at_an_anchor():
  rng = np.random.default_rng(2)
  anchors = _unit(rng.standard_normal((5, 16))).astype(np.float32)
  params = _random_params(rng, 16, DEFAULT)["image"]
  e = 2.5 * anchors[:3]  # Anchors up to scale: d = 0 up to float32 rounding (~4e-7).

  got = llu.update(params, e, anchors, DEFAULT)
  want = _expected_update(params, e, DEFAULT.gamma)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert np.abs(want - _unit(e)).max() > 0.1  # The update is not a no-op.


def test_dirac_updates_anchors_only():
  config = llu.LLUConfig(mode="dirac")
  rng = np.random.default_rng(3)
  anchors = _unit(rng.standard_normal((5, 16))).astype(np.float32)
  params = _random_params(rng, 16, config)["text"]
  near = _unit(anchors[0] + 0.01 * rng.standard_normal(16))  # cos ~ 0.9999, d ~ 1e-4 > 1e-5.
  e = np.stack([anchors[1], near, rng.standard_normal(16)]).astype(np.float32)

  np.testing.assert_array_equal(llu.locality_weight(e, anchors, config), [config.gamma, 0, 0])
  got = np.asarray(llu.update(params, e, anchors, config))
  np.testing.assert_allclose(got[0], _expected_update(params, e[:1], config.gamma)[0],
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(got[1:], _unit(e[1:]), rtol=0, atol=1e-7)


def test_locality_weight_is_per_sample():
  # The paper's code takes the max similarity over the batch: an anchor in the batch would
  # give the far sample the full weight too.
  rng = np.random.default_rng(4)
  anchors = np.pad(rng.standard_normal((4, 8)), ((0, 0), (0, 8))).astype(np.float32)
  far = np.pad(rng.standard_normal(8), (8, 0)).astype(np.float32)
  batch = np.stack([far, anchors[2]])

  together = llu.locality_weight(batch, anchors, DEFAULT)
  alone = [llu.locality_weight(x[None], anchors, DEFAULT)[0] for x in batch]
  np.testing.assert_allclose(together, [FAR_WEIGHT, DEFAULT.gamma], rtol=1e-5)
  np.testing.assert_allclose(together, alone, rtol=1e-6)


def test_no_gradient_flows_through_the_locality_weight():
  rng = np.random.default_rng(5)
  anchors = _unit(rng.standard_normal((4, 16))).astype(np.float32)
  params = _random_params(rng, 16, DEFAULT)["image"]
  e = jnp.asarray(_unit(anchors[:2] + 0.1 * rng.standard_normal((2, 16))), jnp.float32)
  probe = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
  w = llu.locality_weight(e, anchors, DEFAULT)[:, None]

  def with_constant_weight(e):
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    f = e @ params["w"].T + params["b"]
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    out = w * f + (1 - w) * e
    return jnp.sum(probe * out / jnp.linalg.norm(out, axis=-1, keepdims=True))

  def weight_without_stop(e):
    cos = (e / jnp.linalg.norm(e, axis=-1, keepdims=True)) @ anchors.T
    return jnp.sum(DEFAULT.gamma * jnp.exp(DEFAULT.lam * (1 - jnp.clip(cos.max(-1), 0, 1))))

  got = jax.grad(lambda e: jnp.sum(probe * llu.update(params, e, anchors, DEFAULT)))(e)
  np.testing.assert_allclose(got, jax.grad(with_constant_weight)(e), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(
      jax.grad(lambda e: llu.locality_weight(e, anchors, DEFAULT).sum())(e), 0.0)
  assert 0.01 < float(w.min()) < DEFAULT.gamma  # Here the weight does depend on e:
  assert float(jnp.abs(jax.grad(weight_without_stop)(e)).max()) > 1e-3


def test_training_fixes_misaligned_prompts():
  rng = np.random.default_rng(6)
  classes, dim = 5, 32
  basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].T
  centres = basis[:classes]
  # Each prompt sits nearer the next class's images than its own: zero-shot is ~0%.
  text = _unit(0.6 * np.roll(centres, -1, axis=0)
               + 0.8 * basis[classes:2 * classes]).astype(np.float32)
  # Held-out samples get a weight ~0.43 against 0.5 at the training anchors: close enough.
  train, train_labels = _samples(rng, centres, 16, 0.15)
  test, test_labels = _samples(rng, centres, 50, 0.15)
  anchors = {"image": llu.cluster_anchors(train, DEFAULT.image_clusters),
             "text": llu.cluster_anchors(text, DEFAULT.text_clusters)}

  params = _train(llu.init(dim, DEFAULT), train, train_labels, text, anchors, DEFAULT)
  zero_shot = (_zero_shot(test, text).argmax(-1) == test_labels).mean()
  adapted = (np.asarray(llu.logits(params, test, text, anchors, DEFAULT)).argmax(-1)
             == test_labels).mean()
  assert zero_shot <= 0.2, zero_shot
  assert adapted >= 0.95, adapted


def test_base_to_novel_keeps_zero_shot_predictions_on_novel_classes():
  config = llu.LLUConfig(image_clusters=20)
  rng = np.random.default_rng(7)
  dim = 32
  basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].T
  base_space, novel_space = basis[:16], basis[16:]  # Orthogonal: novel data are far (d = 1).
  base_centres, novel_centres = base_space[:5], novel_space[:5]
  base_text = _unit(0.6 * np.roll(base_centres, -1, axis=0) + 0.8 * base_space[5:10])
  novel_text = _unit(novel_centres + 0.3 * novel_space[5:10]).astype(np.float32)
  train, train_labels = _samples(rng, base_centres, 8, 0.15, base_space)
  base_test, base_labels = _samples(rng, base_centres, 20, 0.15, base_space)
  novel_test, novel_labels = _samples(rng, novel_centres, 20, 0.15, novel_space)
  anchors = {"image": llu.cluster_anchors(train, config.image_clusters),
             "text": llu.cluster_anchors(base_text, config.text_clusters)}
  assert anchors["image"].shape == (20, dim)

  params = _train(llu.init(dim, config), train, train_labels, base_text.astype(np.float32),
                  anchors, config)
  # Base and novel images in one batch: a batch-wide distance would update the novel ones too.
  images = np.concatenate([base_test, novel_test])
  base_logits = np.asarray(llu.logits(params, base_test, base_text, anchors, config))
  novel_logits = np.asarray(llu.logits(params, images, novel_text, anchors, config))[
      len(base_test):]
  zero_shot = _zero_shot(novel_test, novel_text)

  base_accuracy = (base_logits.argmax(-1) == base_labels).mean()
  assert base_accuracy >= 0.95, base_accuracy
  np.testing.assert_allclose(novel_logits, zero_shot, rtol=0, atol=FAR_LOGIT_TOL)
  np.testing.assert_array_equal(novel_logits.argmax(-1), zero_shot.argmax(-1))
  assert (zero_shot.argmax(-1) == novel_labels).mean() >= 0.95


def test_cluster_anchors_are_normalised_sums_of_complete_linkage_clusters():
  rng = np.random.default_rng(8)
  x = (rng.standard_normal((12, 8)) * rng.uniform(0.5, 3.0, (12, 1))).astype(np.float32)
  centres = llu.cluster_anchors(x, 4)

  assert centres.shape == (4, 8) and centres.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(centres, axis=-1), 1.0, atol=1e-6)
  units = _unit(x.astype(np.float64))
  labels = scipy.cluster.hierarchy.fcluster(
      scipy.cluster.hierarchy.linkage(units, method="complete", metric="cosine"), 4, "maxclust")
  want = np.stack([_unit(units[labels == c].sum(0)) for c in np.unique(labels)])
  assert len(want) == 4
  order = [int(np.argmax(centres @ w)) for w in want]  # Cluster numbering is arbitrary.
  assert sorted(order) == [0, 1, 2, 3]
  np.testing.assert_allclose(centres[order], want, atol=1e-6)


def test_cluster_anchors_edge_cases():
  rng = np.random.default_rng(9)
  x = rng.standard_normal((6, 8)).astype(np.float32)
  np.testing.assert_allclose(llu.cluster_anchors(x, None), _unit(x), atol=1e-6)
  # More clusters than anchors: clamped, every anchor kept.
  np.testing.assert_allclose(llu.cluster_anchors(x, 10), _unit(x), atol=1e-6)
  # Duplicates (shots sampled with replacement) tie at distance 0: still exactly k centres.
  duplicated = np.concatenate([x, x[:3]])
  assert llu.cluster_anchors(duplicated, 7).shape == (7, 8)
  with pytest.raises(UserError, match="clusters"):
    llu.cluster_anchors(x, 0)


def test_modalities_select_the_updated_towers():
  config = llu.LLUConfig(modalities="image")
  params = llu.init(16, config)
  assert set(params) == {"image"}
  assert llu.num_parameters(params) == 16 * 16 + 16
  assert llu.num_parameters(llu.init(16, DEFAULT)) == 2 * (16 * 16 + 16)

  rng = np.random.default_rng(10)
  params = _random_params(rng, 16, config)
  image = rng.standard_normal((3, 16)).astype(np.float32)
  text = rng.standard_normal((4, 16)).astype(np.float32)
  got = llu.logits(params, image, text, {"image": image}, config)  # No text anchors needed.
  want = 100 * _expected_update(params["image"], image, config.gamma) @ _unit(text).T
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_regularizer_and_loss():
  rng = np.random.default_rng(11)
  params = llu.init(8, DEFAULT)
  assert float(llu.regularizer(params)) == 0.0
  params["text"] = {"w": params["text"]["w"] + 0.5, "b": jnp.full((8,), 2.0)}
  assert float(llu.regularizer(params)) == pytest.approx(0.25 + 4.0)

  image, text = rng.standard_normal((4, 8)), rng.standard_normal((3, 8))
  labels = np.array([0, 1, 2, 0])
  anchors = {"image": image, "text": text}
  value, accuracy = llu.loss(params, image, labels, text, anchors, DEFAULT)
  z = np.asarray(llu.logits(params, image, text, anchors, DEFAULT), np.float64)
  ce = np.mean(np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
               - z[np.arange(4), labels])
  assert float(value) == pytest.approx(ce + DEFAULT.regularization * 4.25, rel=1e-5)
  assert float(accuracy) == (z.argmax(-1) == labels).mean()


@pytest.mark.parametrize("field, value", [
    ("mode", "gauss"), ("gamma", -0.1), ("gamma", 1.5), ("lam", 1.0),
    ("modalities", "audio"), ("image_clusters", 0), ("text_clusters", 2.5),
    ("regularization", -1.0), ("views", 0)])
def test_config_validation(field, value):
  with pytest.raises(UserError, match=f"llu.{field}="):
    llu.LLUConfig(**{field: value})


def test_config_dict_round_trip():
  config = llu.LLUConfig(mode="dirac", modalities="text", text_clusters=8)
  assert llu.LLUConfig.from_dict(config.to_dict()) == config
  with pytest.raises(UserError, match="unknown LLU option"):
    llu.LLUConfig.from_dict({"gama": 0.5})
