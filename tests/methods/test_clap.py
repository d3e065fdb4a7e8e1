"""CLAP and ZS-LP (clip_lora_jax/methods/clap.py): the logits, the class-wise penalty and its
multipliers literally against numpy, the zero-shot start on an unnormalised base, learning with
and without the constraint, bad settings."""

import numpy as np
import pytest
from separable import separable_task, train

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import clap, feature_cache, zero_shot

SGD = dict(name="sgd", learning_rate=0.1, min_learning_rate=0.0, momentum=0.9, b1=0.9,
           b2=0.999, eps=1e-8, weight_decay=0.0)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def task():
  """A separable task whose base prototypes are unnormalised (norms 2 to 9), as the run's."""
  task = separable_task(classes=5, shots=4, views=3, embed=12, hint=0.05)
  norms = np.random.default_rng(1).uniform(2, 9, size=(task.num_classes, 1))
  return feature_cache.Task(**{**vars(task),
                               "classifier": (task.classifier * norms).astype(np.float32)})


def test_multipliers_are_the_zero_shot_true_class_probabilities(task):
  logits = 100.0 * _unit(task.views) @ _unit(task.classifier).T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  onehot = np.eye(task.num_classes)[task.view_labels]
  # The official `diag(softmax(logits).T @ onehot) / onehot.sum(0)`.
  expected = np.diag(probs.T @ onehot) / onehot.sum(0)
  l2 = clap.init(task, clap.Config(constraint="l2"))[feature_cache.FROZEN]["multipliers"]
  np.testing.assert_allclose(l2, expected, rtol=1e-4, atol=1e-6)
  balanced = clap.init(task, clap.Config(constraint="l2_balanced"))
  np.testing.assert_array_equal(balanced[feature_cache.FROZEN]["multipliers"], np.ones(5))


def test_logits_and_loss_are_the_official_forms(task):
  config = clap.Config(constraint="l2")
  params = clap.init(task, config)
  # The start is zero-shot CLIP, whatever the norms of the base prototypes.
  np.testing.assert_allclose(
      clap.logits(params, task.val, config),
      zero_shot.logits({feature_cache.FROZEN: {"classifier": _unit(task.classifier)}},
                       task.val, zero_shot.Config()), rtol=1e-5, atol=1e-4)
  moved = task.classifier + np.random.default_rng(2).normal(size=task.classifier.shape)
  params = {**params, "prototypes": moved.astype(np.float32)}
  logits = 100.0 * _unit(task.val) @ _unit(moved).T
  np.testing.assert_allclose(clap.logits(params, task.val, config), logits, rtol=1e-5, atol=1e-4)
  shifted = logits - logits.max(-1, keepdims=True)
  ce = np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(logits)), task.val_labels])
  lambdas = np.asarray(params[feature_cache.FROZEN]["multipliers"])
  constraint = np.mean(lambdas * np.sum((moved - task.classifier) ** 2, axis=-1))
  for name, expected in (("l2", ce + constraint), ("none", ce)):
    value, scores = clap.loss(params, task.val, task.val_labels, clap.Config(constraint=name))
    assert float(value) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-4)


def test_learns_and_the_constraint_holds_the_prototypes(task):
  def run(constraint):
    config = clap.Config(constraint=constraint)
    params = train(clap, config, task, SGD, steps=60)
    top1 = feature_cache.accuracy(clap.logits(params, task.val, config), task.val_labels)
    return top1, np.linalg.norm(params["prototypes"] - task.classifier)
  zero_shot_top1 = feature_cache.accuracy(
      clap.logits(clap.init(task, clap.Config()), task.val, clap.Config()), task.val_labels)
  (zslp_top1, zslp_drift), (clap_top1, clap_drift) = run("none"), run("l2_balanced")
  assert zero_shot_top1 < 60.0 and zslp_top1 == 100.0 and clap_top1 > zero_shot_top1
  assert clap_drift < zslp_drift


def test_counts_and_base():
  assert clap.CLASSIFIER == "raw_mean"  # the official unnormalised base, see the docstring
  params = clap.init(separable_task(classes=3, embed=4), clap.Config())
  assert feature_cache.num_parameters(params) == 3 * 4


def test_bad_constraint():
  with pytest.raises(UserError, match="clap.constraint='cosine'"):
    clap.Config(constraint="cosine")
