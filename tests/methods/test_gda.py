"""GDA (clip_lora_jax/methods/gda.py) against a numpy computation of its closed form and the
official alpha search, on synthetic tasks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, gda

FROZEN = feature_cache.FROZEN


def unit(a: np.ndarray) -> np.ndarray:
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


def closed_form(task: feature_cache.Task) -> tuple[np.ndarray, np.ndarray]:
  """W = mu P, b = log(1/C) - diag(mu P mu^T) / 2, P = D inv((N-1) S + tr(S) I), S the
  covariance of the class-centred unit views (float64, loops)."""
  x = unit(task.views.astype(np.float64))
  classes = task.num_classes
  mu = np.zeros((classes, x.shape[1]))
  for c in range(classes):
    mu[c] = x[task.view_labels == c].sum(0) / np.sum(task.view_labels == c)
  z = np.concatenate([x[task.view_labels == c] - mu[c] for c in range(classes)])
  count, dim = z.shape
  zc = z - z.mean(0)
  s = zc.T @ zc / (count - 1)
  p = dim * np.linalg.inv((count - 1) * s + np.trace(s) * np.eye(dim))
  w = mu @ p
  b = np.array([np.log(1.0 / classes) - mu[c] @ p @ mu[c] / 2 for c in range(classes)])
  return w, b


def test_closed_form_and_logits_match_numpy(task):
  params = gda.init(task, gda.Config())
  w, b = closed_form(task)
  np.testing.assert_allclose(params[FROZEN]["weights"], w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(params[FROZEN]["bias"], b, rtol=1e-5, atol=1e-5)
  assert feature_cache.num_parameters(params) == 0  # training-free
  params = {FROZEN: {**params[FROZEN], "alpha": np.float32(0.37)}}
  x = np.random.default_rng(2).normal(size=(5, task.views.shape[-1])).astype(np.float32)
  f = unit(x.astype(np.float64))
  expected = 100.0 * f @ task.classifier.T + 0.37 * (f @ w.T + b)
  np.testing.assert_allclose(gda.logits(params, x, gda.Config()), expected, rtol=1e-5,
                             atol=1e-4)


def official_alpha(params, val, labels, alphas):
  """The official search: the first alpha of strictly best top-1, 0.1 if none scores > 0%."""
  f = unit(val.astype(np.float64))
  frozen = {k: np.asarray(v, np.float64) for k, v in params[FROZEN].items()}
  best_acc, best_alpha = 0, 0.1
  for alpha in alphas:
    scores = 100.0 * f @ frozen["classifier"].T + alpha * (f @ frozen["weights"].T
                                                            + frozen["bias"])
    acc = 100 * np.mean(np.argmax(scores, -1) == labels)
    if acc > best_acc:
      best_acc, best_alpha = acc, alpha
  return best_alpha


def test_alpha_is_searched_on_the_validation_shots_only(make_task):
  task = make_task(val_shots=6, noise=0.8, seed=3)
  config = gda.Config()
  params = gda.init(task, config)
  chosen = float(gda.select(params, task, config)[FROZEN]["alpha"])
  assert chosen == pytest.approx(official_alpha(params, task.val, task.val_labels,
                                                config.alphas))
  nan = lambda a: np.full_like(a, np.nan)
  blind = dataclasses.replace(task, views=nan(task.views), shots=nan(task.shots),
                              classifier=nan(task.classifier), projection=nan(task.projection))
  assert float(gda.select(params, blind, config)[FROZEN]["alpha"]) == chosen
  # Labels the zero-shot classifier gets right: the smallest alpha; labels no alpha gets
  # right (two alphas, three classes: one class is never predicted): the official default 0.1.
  f = unit(task.val)
  zero_shot = np.argmax(f @ task.classifier.T, -1).astype(np.int32)
  easy = gda.select(params, dataclasses.replace(task, val_labels=zero_shot), config)
  assert float(easy[FROZEN]["alpha"]) == pytest.approx(1e-4)
  predicted = [np.argmax(np.asarray(gda.logits({FROZEN: {**params[FROZEN], "alpha": a}},
                                               task.val, config)), -1) for a in (1.0, 10.0)]
  missed = [next(c for c in range(task.num_classes) if all(p[i] != c for p in predicted))
            for i in range(len(task.val))]
  wrong = gda.select(params, dataclasses.replace(task, val_labels=np.array(missed)), gda.Config(
      alphas=(1.0, 10.0)))
  assert float(wrong[FROZEN]["alpha"]) == pytest.approx(gda.DEFAULT_ALPHA)
  assert chosen != pytest.approx(1e-4)  # the search mattered


def test_no_validation_shots_a_class_without_shots_and_bad_alphas_are_refused(task):
  none = dataclasses.replace(task, val=task.val[:0], val_labels=task.val_labels[:0])
  with pytest.raises(UserError, match="validation shots"):
    gda.select(gda.init(task, gda.Config()), none, gda.Config())
  shotless = dataclasses.replace(task, view_labels=np.minimum(task.view_labels, 1))
  with pytest.raises(UserError, match=r"classes \[2\] have no training shot"):
    gda.init(shotless, gda.Config())
  for alphas in ((), (-1.0,), (1.0, float("nan"))):
    with pytest.raises(UserError, match=r"^gda\.alphas="):
      gda.Config.from_dict({"alphas": alphas})
