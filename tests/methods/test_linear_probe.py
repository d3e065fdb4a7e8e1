"""Linear probe (clip_lora_jax/methods/linear_probe.py): the JAX L-BFGS fit against sklearn's
LogisticRegression, the official C search step by step, the search seeing only the validation
shots, bad settings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from separable import separable_task
from sklearn.linear_model import LogisticRegression

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, linear_probe

CONFIG = linear_probe.Config()


def _objective(w, b, x, labels, c):
  """sklearn's objective in float64: C * sum CE + 0.5 ||W||^2."""
  z = x.astype(np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
  z = z - z.max(-1, keepdims=True)
  return c * np.sum(np.log(np.exp(z).sum(-1)) - z[np.arange(len(x)), labels]) + 0.5 * np.sum(
      np.asarray(w, np.float64) ** 2)


@pytest.mark.parametrize("classes", [3, 2])  # 2: sklearn's binomial model
@pytest.mark.parametrize("c", [0.1, 1.0])
def test_fit_matches_sklearn(classes, c):
  # Overlapping classes (a close optimum), moderate C. sklearn solved to 1e-10 in float64; ours
  # in float32 to the max-|gradient| tolerance 1e-6: the probabilities agree to 1e-3 and our
  # objective is no worse than sklearn's to 1e-6 relative (the float32 resolution of it).
  task = separable_task(classes=classes, shots=8, views=1, embed=8, seed=3)
  x = task.shots + np.random.default_rng(0).normal(size=task.shots.shape).astype(np.float32) * 3
  params = linear_probe.fit(x, task.shot_labels, jnp.float32(c), classes, 1000, 1e-6)
  reference = LogisticRegression(C=c, tol=1e-10, max_iter=100_000).fit(x, task.shot_labels)
  ours = jax.nn.softmax(linear_probe.logits(params, x, CONFIG))
  np.testing.assert_allclose(ours, reference.predict_proba(x), atol=1e-3)
  theirs = (reference.coef_, reference.intercept_) if classes > 2 else (
      np.concatenate([-reference.coef_, reference.coef_]) / 2,
      np.concatenate([-reference.intercept_, reference.intercept_]) / 2)
  multinomial_c = c / 2 if classes == 2 else c  # the binomial model's multinomial twin
  assert (_objective(params["w"], params["b"], x, task.shot_labels, multinomial_c)
          <= _objective(*theirs, x, task.shot_labels, multinomial_c) * (1 + 1e-6))


def test_logits_are_affine():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 5)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32)}
  x = rng.normal(size=(4, 5)).astype(np.float32)
  np.testing.assert_allclose(linear_probe.logits(params, x, CONFIG),
                             x @ params["w"].T + params["b"], rtol=1e-5, atol=1e-5)


def test_search_is_the_official_bisection():
  # A validation score peaking at C = 300: the grid's peak is 100, then [10, 1000] is bisected
  # in log10 towards 300: 8 halvings leave the choice within 2 / 2^8 of log10(300).
  seen = []
  def score(c):
    seen.append(c)
    return -abs(math.log10(c) - math.log10(300.0))
  choice = linear_probe.bisect(score, linear_probe.GRID, 8)
  assert seen[:7] == list(linear_probe.GRID) and seen[7:9] == [pytest.approx(10.0),
                                                              pytest.approx(1000.0)]
  assert abs(math.log10(choice) - math.log10(300.0)) < 2 / 2 ** 8
  # Ties: the first of the grid (1e6), then always the left end, which never moves.
  assert linear_probe.bisect(lambda c: 0.5, linear_probe.GRID, 8) == pytest.approx(1e5)
  assert linear_probe.bisect(lambda c: -abs(math.log10(c) - 2.1), linear_probe.GRID, 0) == 100.0


def test_search_sees_only_the_validation_shots(monkeypatch):
  task = separable_task(classes=3, shots=8, views=1, embed=8, seed=3)
  calls = []
  search = linear_probe.search_c
  def spy(shots, shot_labels, val, val_labels, num_classes, config):
    calls.append((shots, val, val_labels))
    return search(shots, shot_labels, val, val_labels, num_classes, config)
  monkeypatch.setattr(linear_probe, "search_c", spy)
  config = linear_probe.Config(search_steps=2)
  params = linear_probe.init(task, config)
  (shots, val, val_labels), = calls
  assert shots is task.shots and val is task.val and val_labels is task.val_labels
  assert feature_cache.num_parameters(params) == 3 * (8 + 1)
  assert feature_cache.accuracy(linear_probe.logits(params, task.val, config),
                                task.val_labels) == 100.0
  # A fixed C searches nothing and is what the probe is fit with.
  fixed = linear_probe.init(task, linear_probe.Config(c=0.5))
  assert len(calls) == 1 and float(fixed[feature_cache.FROZEN]["c"]) == 0.5
  np.testing.assert_allclose(
      fixed["w"], linear_probe.fit(task.shots, task.shot_labels, jnp.float32(0.5), 3, 1000,
                                   1e-4)["w"])


def test_no_validation_shots_needs_a_fixed_c():
  task = separable_task(classes=3, shots=8, views=1, embed=8, seed=3)
  empty = feature_cache.Task(**{**vars(task), "val": task.val[:0], "val_labels":
                                task.val_labels[:0]})
  with pytest.raises(UserError, match="linear_probe.c"):
    linear_probe.init(empty, CONFIG)


@pytest.mark.parametrize("bad, match", [
    (dict(grid=()), "linear_probe.grid"), (dict(grid=(1.0, 0.0)), "linear_probe.grid"),
    (dict(search_steps=-1), "linear_probe.search_steps"),
    (dict(max_iter=0), "linear_probe.max_iter"), (dict(tol=0.0), "linear_probe.tol"),
    (dict(c=-1.0), "linear_probe.c"), (dict(C=1.0), "unknown linear_probe option")])
def test_bad_settings(bad, match):
  with pytest.raises(UserError, match=match):
    linear_probe.Config.from_dict(bad)
