"""LP++ (clip_lora_jax/methods/lp_plus_plus.py): the official logit form, initialisation and
step sizes against numpy, the descent epoch by epoch against the official loop in torch (its
never-zeroed alpha gradient and best-validation epoch included), learning, bad settings."""

import numpy as np
import pytest
import scipy.linalg
from separable import separable_task

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, lp_plus_plus, zero_shot

CONFIG = lp_plus_plus.Config()


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def task():
  """Overlapping classes: the validation accuracy goes up and down along the descent."""
  task = separable_task(classes=4, shots=3, views=1, val=3, embed=8, hint=0.3)
  noise = np.random.default_rng(0).normal
  noisy = lambda x: (x + 3 * noise(size=x.shape)).astype(np.float32)
  return feature_cache.Task(**{**vars(task), "views": noisy(task.views), "val": noisy(task.val)})


def test_logits_are_the_official_form(task):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 8)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32),
            "alpha": rng.normal(size=(4,)).astype(np.float32),
            feature_cache.FROZEN: {"classifier": task.classifier}}
  f = _unit(task.val)
  vision = f @ params["w"].T + params["b"]  # classifier(features)
  text = f @ task.classifier.T  # features @ text_weights
  expected = vision + (np.ones((len(f), 1)) @ params["alpha"][None, :]) * text
  np.testing.assert_allclose(lp_plus_plus.logits(params, task.val, CONFIG), expected,
                             rtol=1e-5, atol=1e-5)


def test_initialisation_and_step_sizes_are_the_official_ones(task):
  f = _unit(task.views.astype(np.float64))
  n, shots = len(f), 3
  onehot = np.eye(4)[task.view_labels]
  start = lp_plus_plus.start(f, task.view_labels, task.classifier, views=1)
  np.testing.assert_allclose(start["w"], onehot.T @ f, rtol=1e-6, atol=1e-6)  # compute_centroids
  np.testing.assert_array_equal(start["b"], np.zeros(4))
  alpha_tilde = (onehot.T @ (f @ task.classifier.T)) / onehot.sum(0)[:, None] * shots
  np.testing.assert_allclose(start["alpha"], np.full(4, np.mean(250 / shots * alpha_tilde)),
                             rtol=1e-6)
  lr_w, lr_alpha = lp_plus_plus.step_sizes(f, task.classifier)
  assert lr_w == pytest.approx(4 * n / max(scipy.linalg.eigh(f.T @ f)[0]), rel=1e-9)
  assert lr_alpha == pytest.approx(
      n / (4 * max(np.sum((f @ task.classifier.T) ** 2, axis=0))), rel=1e-9)


def _official(task, epochs, alpha_every, validate):
  """linear_probe_p2.py's loop in torch (float64), b starting at 0; the best-validation epoch's
  parameters (the last of equals) when `validate`, else the last epoch's."""
  import torch
  f = torch.tensor(_unit(task.views), dtype=torch.float64)
  labels = torch.tensor(task.view_labels)
  val = torch.tensor(_unit(task.val), dtype=torch.float64)
  text_weights = torch.tensor(task.classifier.T, dtype=torch.float64)
  start = lp_plus_plus.start(f.numpy(), task.view_labels, task.classifier, views=1)
  lr_w, lr_alpha = lp_plus_plus.step_sizes(f.numpy(), task.classifier)
  classifier = torch.nn.Linear(f.shape[1], 4, bias=True).double()
  with torch.no_grad():
    classifier.weight.copy_(torch.tensor(np.asarray(start["w"]), dtype=torch.float64))
    classifier.bias.zero_()
  alpha_vec = torch.tensor(np.asarray(start["alpha"], np.float64)[None, :], requires_grad=True)
  optimizer = torch.optim.SGD(classifier.parameters(), lr_w, momentum=0.9)
  best_acc, best = 0.0, {}
  for epoch in range(epochs):
    logits = classifier(f) + torch.ones(f.shape[0], 1, dtype=torch.float64) @ alpha_vec * (
        f @ text_weights)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if (epoch + 1) % alpha_every == 0:
      alpha_vec.data -= lr_alpha * alpha_vec.grad.data
    logits_val = classifier(val) + torch.ones(val.shape[0], 1, dtype=torch.float64) @ alpha_vec \
        * (val @ text_weights)
    acc_val = np.mean(logits_val.argmax(dim=1).numpy() == task.val_labels) * 100.0 \
        if validate else 0.0
    if acc_val >= best_acc:
      best_acc = acc_val
      best = {"w": classifier.weight.detach().numpy().copy(),
              "b": classifier.bias.detach().numpy().copy(),
              "alpha": alpha_vec.detach().numpy()[0].copy()}
  return best


def test_descent_is_the_official_loop(task):
  # 25 epochs, alpha stepped every 4 with its summed gradient; float32 against float64.
  config = lp_plus_plus.Config(epochs=25, alpha_every=4)
  last = _official(task, 25, 4, validate=False)
  best = _official(task, 25, 4, validate=True)
  assert not np.allclose(best["w"], last["w"])  # the best epoch on validation is not the last
  without_val = feature_cache.Task(**{**vars(task), "val": task.val[:0],
                                      "val_labels": task.val_labels[:0]})
  for ours, expected in ((lp_plus_plus.init(without_val, config), last),
                         (lp_plus_plus.init(task, config), best)):
    for key in ("w", "b", "alpha"):
      np.testing.assert_allclose(ours[key], expected[key], rtol=1e-4, atol=1e-4)


def test_learns_separable_classes():
  task = separable_task(classes=6, shots=4, views=1, embed=16, hint=0.05)
  params = lp_plus_plus.init(task, CONFIG)
  zero_shot_top1 = feature_cache.accuracy(zero_shot.logits(
      zero_shot.init(task, zero_shot.Config()), task.val, zero_shot.Config()), task.val_labels)
  assert zero_shot_top1 < 60.0
  assert feature_cache.accuracy(lp_plus_plus.logits(params, task.val, CONFIG),
                                task.val_labels) == 100.0
  assert feature_cache.num_parameters(params) == 6 * (16 + 2)


@pytest.mark.parametrize("bad, match", [
    (dict(epochs=0), "lp_plus_plus.epochs"), (dict(alpha_every=0), "lp_plus_plus.alpha_every"),
    (dict(momentum=1.0), "lp_plus_plus.momentum"), (dict(lr=1.0), "unknown lp_plus_plus")])
def test_bad_settings(bad, match):
  with pytest.raises(UserError, match=match):
    lp_plus_plus.Config.from_dict(bad)
