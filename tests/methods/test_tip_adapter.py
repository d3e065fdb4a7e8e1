"""Tip-Adapter and Tip-Adapter-F (clip_lora_jax/methods/tip_adapter.py) against numpy and the
official code's formulas, on synthetic tasks."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from clip_lora_jax import training
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import METHODS, feature_cache, tip_adapter

Config = tip_adapter.Config


def unit(a: np.ndarray) -> np.ndarray:
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_keys_are_the_normalised_means_of_each_shots_views(task):
  expected = np.stack([unit(task.views[task.view_shots == s].astype(np.float64).mean(0))
                       for s in range(len(task.shots))])
  np.testing.assert_allclose(tip_adapter.cache_keys(task), expected, rtol=0, atol=1e-6)
  params = tip_adapter.init(task, Config(init_alpha=2.0, init_beta=3.0))
  frozen = params[feature_cache.FROZEN]
  np.testing.assert_array_equal(frozen["values"], np.eye(task.num_classes)[task.shot_labels])
  np.testing.assert_array_equal(frozen["classifier"], task.classifier)
  assert (float(frozen["alpha"]), float(frozen["beta"])) == (2.0, 3.0)
  # Tip-Adapter: nothing trains (the run then takes no step); Tip-Adapter-F: the keys only.
  assert feature_cache.trainable(params) == {}
  assert feature_cache.num_parameters(params) == 0
  trained = tip_adapter.init(task, Config(train_keys=True))
  assert list(feature_cache.trainable(trained)) == ["keys"]
  assert feature_cache.num_parameters(trained) == expected.size


def test_logits_are_the_official_formula(task):
  """100 f W^T + alpha exp(-beta (1 - f F^T)) L, with keys no longer unit (as trained)."""
  rng = np.random.default_rng(1)
  params = tip_adapter.init(task, Config(train_keys=True))
  keys = np.asarray(params["keys"]) * 1.3 + 0.05 * rng.normal(size=params["keys"].shape)
  params = {"keys": keys.astype(np.float32),
            feature_cache.FROZEN: {**params[feature_cache.FROZEN],
                                   "alpha": np.float32(2.3), "beta": np.float32(5.5)}}
  x = rng.normal(size=(6, task.views.shape[-1])).astype(np.float32)
  f = unit(x.astype(np.float64))
  values = np.eye(task.num_classes)[task.shot_labels]
  expected = 100.0 * f @ task.classifier.T + 2.3 * np.exp(-5.5 * (1.0 - f @ keys.T)) @ values
  got = np.asarray(tip_adapter.logits(params, x, Config(train_keys=True)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_search_grids_are_the_official_lists():
  for scale, steps in ((7.0, 200), (3.0, 20), (50.0, 200)):
    official = [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]
    np.testing.assert_array_equal(tip_adapter.search_grid(scale, steps),
                                  np.asarray(official, np.float32))


def official_search_hp(params, val, labels, config):
  """utils.search_hp of the official code, transcribed (numpy, float64)."""
  frozen = params[feature_cache.FROZEN]
  f = unit(val.astype(np.float64))
  keys = np.asarray(params.get("keys", frozen.get("keys")), np.float64)
  steps, scale = config.search_steps, config.search_scale
  beta_list = [i * (scale[0] - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
  alpha_list = [i * (scale[1] - 0.1) / steps[1] + 0.1 for i in range(steps[1])]
  best_acc, best_beta, best_alpha = 0, 0, 0
  for beta in beta_list:
    for alpha in alpha_list:
      affinity = f @ keys.T
      cache_logits = np.exp((-1) * (beta - beta * affinity)) @ np.asarray(frozen["values"])
      clip_logits = 100.0 * f @ np.asarray(frozen["classifier"]).T
      acc = 100 * np.mean(np.argmax(clip_logits + cache_logits * alpha, -1) == labels)
      if acc > best_acc:
        best_acc, best_beta, best_alpha = acc, beta, alpha
  return best_beta, best_alpha


@pytest.mark.parametrize("train_keys", [False, True])
def test_search_is_the_official_search_on_the_validation_shots_only(make_task, train_keys):
  # A poor zero-shot classifier and more validation shots: the cache has to be weighed.
  task = make_task(val_shots=6, noise=0.8, seed=3)
  config = Config(train_keys=train_keys, search_scale=(12.0, 10.0), search_steps=(24, 8))
  # The cache's shots in a random order, one left out: classes of unequal sizes.
  params = jax.tree.map(np.asarray, tip_adapter.init(task, config))
  keep = np.random.default_rng(4).permutation(len(task.shots))[1:]
  frozen = {**params[feature_cache.FROZEN],
            "values": params[feature_cache.FROZEN]["values"][keep]}
  if train_keys:
    params = {"keys": params["keys"][keep], feature_cache.FROZEN: frozen}
  else:
    params = {feature_cache.FROZEN: {**frozen, "keys": frozen["keys"][keep]}}
  expected = official_search_hp(params, task.val, task.val_labels, config)
  chosen = tip_adapter.select(params, task, config)[feature_cache.FROZEN]
  np.testing.assert_allclose((float(chosen["beta"]), float(chosen["alpha"])), expected,
                             rtol=1e-6)
  assert expected != (0.1, 0.1)  # the search mattered
  # Everything but the validation shots unusable: the same choice.
  nan = lambda a: np.full_like(a, np.nan)
  blind = dataclasses.replace(task, views=nan(task.views), shots=nan(task.shots),
                              classifier=nan(task.classifier), projection=nan(task.projection))
  again = tip_adapter.select(params, blind, config)[feature_cache.FROZEN]
  assert (float(again["beta"]), float(again["alpha"])) == (float(chosen["beta"]),
                                                            float(chosen["alpha"]))
  # Validation labels the zero-shot classifier already gets right: the first grid point wins.
  zero_shot = np.argmax(unit(task.val) @ task.classifier.T, -1).astype(np.int32)
  easy = tip_adapter.select(params, dataclasses.replace(task, val_labels=zero_shot), config)
  assert float(easy[feature_cache.FROZEN]["beta"]) == pytest.approx(0.1)
  assert float(easy[feature_cache.FROZEN]["alpha"]) == pytest.approx(0.1)


def test_no_search_keeps_the_initial_values_and_a_search_needs_validation_shots(task):
  params = tip_adapter.init(task, Config(init_alpha=2.0))
  kept = tip_adapter.select(params, task, Config(init_alpha=2.0, search=False))
  assert float(kept[feature_cache.FROZEN]["alpha"]) == 2.0
  none = dataclasses.replace(task, val=task.val[:0], val_labels=task.val_labels[:0])
  with pytest.raises(UserError, match="tip_adapter.search=False"):
    tip_adapter.select(params, none, Config())


def test_tip_adapter_f_learns_its_keys_and_leaves_the_frozen_entries_alone(task):
  config = Config(train_keys=True, init_alpha=3.0, init_beta=1.0)
  params = tip_adapter.init(task, config)
  params = jax.tree.map(np.array, params)  # copies: the train step donates its state
  frozen = jax.tree.map(np.copy, params[feature_cache.FROZEN])
  steps = 100
  optimizer = training.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=0.1, min_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-4,
      weight_decay=1e-2)), steps)
  start = jax.tree.map(np.copy, feature_cache.trainable(params))
  state = {"step": np.int32(0), "params": start, "opt_state": optimizer.init(start)}
  train_step = feature_cache.make_train_step(tip_adapter, config, optimizer)
  losses = []
  for _ in range(steps):
    state, metrics = train_step(state, params[feature_cache.FROZEN], task.views, task.view_labels)
    losses.append(float(metrics["loss"]))
  before = feature_cache.accuracy(tip_adapter.logits(params, task.views, config), task.view_labels)
  trained = {**state["params"], feature_cache.FROZEN: params[feature_cache.FROZEN]}
  after = feature_cache.accuracy(tip_adapter.logits(trained, task.views, config),
                                 task.view_labels)
  assert before < 80.0 and after == 100.0, (before, after)
  assert losses[-1] < 0.2 * losses[0], losses
  assert not np.allclose(state["params"]["keys"], params["keys"])
  assert list(state["params"]) == ["keys"]
  jax.tree.map(np.testing.assert_array_equal, params[feature_cache.FROZEN], frozen)


@pytest.mark.parametrize("override, key", [
    ({"init_alpha": -1.0}, "init_alpha"), ({"init_beta": float("inf")}, "init_beta"),
    ({"search_scale": (0.05, 3.0)}, "search_scale"), ({"search_scale": (7.0,)}, "search_scale"),
    ({"search_steps": (0, 20)}, "search_steps"), ({"search_steps": (200, 2.5)}, "search_steps"),
    ({"train_keys": "yes"}, "train_keys"), ({"search": 1}, "search")])
def test_bad_settings_are_refused_by_name(override, key):
  with pytest.raises(UserError, match=rf"^tip_adapter\.{key}="):
    Config.from_dict({**Config().to_dict(), **override})


def test_registered_under_both_names_with_the_official_recipes():
  from configs import tip_adapter_f as f_recipe
  from configs import tip_adapter as recipe
  assert METHODS["tip_adapter"].module == METHODS["tip_adapter_f"].module == "tip_adapter"
  eurosat = f_recipe.get_config("dataset=eurosat")
  assert (eurosat.epochs, eurosat.tip_adapter.train_keys, eurosat.select_epoch) == (100, True, True)
  assert f_recipe.get_config("dataset=dtd").epochs == 20
  flowers = recipe.get_config("dataset=oxford_flowers")
  assert flowers.epochs == 0 and not flowers.tip_adapter.train_keys
  assert (flowers.tip_adapter.init_alpha, flowers.tip_adapter.search_scale) == (10.0, (50.0, 50.0))
  Config.from_dict(flowers.tip_adapter.to_dict())
  with pytest.raises(UserError, match="Tip-Adapter has settings for"):
    recipe.get_config("dataset=mnist")
