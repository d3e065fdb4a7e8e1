"""Training: the schedule and optimizer against torch, the train step on a separable task."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from clip_lora_jax import lora, methods, model, prompts, training
from clip_lora_jax.methods import lora as lora_method
from configs import fewshot
from clip_lora_jax.errors import UserError

TINY = model.get_config("tiny")


@pytest.mark.parametrize("step", [0, 1, 17, 2000, 3999, 4000, 7999, 8000])
def test_schedule_is_cosine_to_min_lr(step):
  config = fewshot.get_config()
  steps = training.total_steps(config)
  assert steps == 8000  # 500 x 16 shots.
  expected = 1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi * step / steps)) / 2
  assert float(training.learning_rate_schedule(config.optimizer, steps)(step)) == \
      pytest.approx(expected, rel=1e-5)


def test_optimizer_matches_torch_adamw_with_cosine_annealing():
  """optax AdamW + our schedule == torch.optim.AdamW + CosineAnnealingLR, step for step."""
  config = fewshot.get_config()
  steps = 20
  config.optimizer.learning_rate = 1e-2  # Large enough for the schedule to matter.
  rng = np.random.default_rng(0)
  init = rng.normal(size=(6, 3)).astype(np.float32)
  grads = rng.normal(size=(steps, 6, 3)).astype(np.float32)

  opt = training.make_optimizer(config.optimizer, steps)
  params = jnp.asarray(init)
  state = opt.init(params)
  for g in grads:
    updates, state = opt.update(jnp.asarray(g), state, params)
    params = params + updates

  p = torch.nn.Parameter(torch.tensor(init))
  o = config.optimizer
  t_opt = torch.optim.AdamW([p], lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(t_opt, steps, eta_min=o.min_learning_rate)
  for g in grads:
    p.grad = torch.tensor(g)
    t_opt.step()
    sched.step()
  np.testing.assert_allclose(params, p.detach().numpy(), rtol=0, atol=1e-6)


def separable_batch(rng: np.random.Generator, n: int, classes: int):
  """Images whose class is their mean colour: a task a tiny CLIP can learn in a few steps."""
  labels = rng.integers(0, classes, n)
  colours = np.eye(3, dtype=np.float32)[labels % 3] * 2 - 1
  images = colours[:, None, None, :] + 0.1 * rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


@pytest.mark.parametrize("encoders", ["both", "vision"])
def test_train_steps_lower_the_loss_and_are_deterministic(encoders):
  config = fewshot.get_config()
  config.optimizer.learning_rate = 1e-2
  base = model.init_params(jax.random.key(0), TINY)
  lora_config = lora.LoRAConfig(encoders=encoders, rank=4, dropout=0.0)
  step_config = lora_method.StepConfig(TINY, lora_config, logit_scale=100.0)
  ids = np.zeros((3, 8), np.int32)
  ids[:, 0], ids[:, 1], ids[:, 2] = 49406, [320, 1125, 539], 49407
  text = (prompts.pack_prompts(ids) if step_config.text_trains
          else model.encode_texts(base, ids, TINY))
  optimizer = training.make_optimizer(config.optimizer, 30)
  images, labels = separable_batch(np.random.default_rng(0), 24, 3)

  def run():
    state = lora_method.init_state(0, lora.init(jax.random.PRNGKey(0), TINY, lora_config),
                                   optimizer)
    step = lora_method.make_train_step(step_config, optimizer)
    losses = []
    for _ in range(30):
      state, m = step(state, base, images, labels, text)
      losses.append(float(m["loss"]))
    return state, losses

  state, losses = run()
  assert int(state["step"]) == 30
  assert losses[-1] < 0.5 * losses[0], losses
  # The frozen parts really are frozen: only LoRA entries are in the state.
  assert set(state["lora"]) == set(lora.ENCODERS[encoders])
  state_again, losses_again = run()
  assert losses == losses_again
  for x, y in zip(jax.tree.leaves(state["lora"]), jax.tree.leaves(state_again["lora"])):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("key,value,message", [
    ("shots", 0, "shots"), ("batch_size", -1, "batch_size"), ("dtype", "float16", "dtype"),
    ("template", "a photo", "template"), ("attention", "flash", "attention"),
])
def test_bad_run_config_is_a_user_error(key, value, message):
  config = fewshot.get_config()
  config[key] = value
  with pytest.raises(UserError, match=message):
    training.validate(config)


def test_unknown_method_is_a_user_error():
  config = fewshot.get_config()
  config.method = "plot"
  with pytest.raises(UserError, match="config.method='plot': use one of lora, block_lora, llu"):
    methods.train_and_evaluate(config, "/nonexistent/never-written")
  with pytest.raises(UserError, match="no weight-space adapter"):
    lora_method.lora_config_from(config)


def test_sampler_is_resolved_before_anything_is_written(tmp_path):
  config = fewshot.get_config()  # EuroSAT, no split file
  config.sampler = "reference"
  with pytest.raises(UserError, match="sampler='reference' needs the protocol's split file for "
                                      "eurosat"):
    training.start_run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_published_shot_lists_select_their_sampler_and_are_checked_first(tmp_path):
  config = fewshot.get_config()
  config.shot_lists = str(tmp_path / "missing")
  with pytest.raises(UserError, match="config.shot_lists=.* is not a directory"):
    training.start_run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  config.shot_lists = str(tmp_path)
  training.resolve(config)
  assert config.sampler == "lists"


def test_bad_lora_section_is_a_user_error():
  config = fewshot.get_config()
  config.lora.rank = 0
  with pytest.raises(UserError, match="rank"):
    lora_method.lora_config_from(config)
  config = fewshot.get_config()
  config.lora.layers = "sideways"
  with pytest.raises(UserError, match="layers"):
    lora_method.lora_config_from(config)


def test_config_argument_reaches_every_dataset_shot_and_seed():
  config = fewshot.get_config("dataset=dtd,shots=4,seed=2")
  assert (config.dataset, config.shots, config.seed) == ("dtd", 4, 2)
  assert training.total_steps(config) == 2000
  with pytest.raises(UserError, match="expected key=value"):
    fewshot.get_config("datset=dtd")
  with pytest.raises(UserError, match="not a valid int"):
    fewshot.get_config("shots=many")


def test_bfloat16_compute_keeps_float32_parameters_and_tracks_float32():
  base = model.init_params(jax.random.key(0), TINY)
  lora_config = lora.LoRAConfig(rank=4, dropout=0.0)
  ids = np.zeros((3, 8), np.int32)
  ids[:, 0], ids[:, 1], ids[:, 2] = 49406, [320, 1125, 539], 49407
  opt_config = fewshot.get_config().optimizer
  optimizer = training.make_optimizer(opt_config, 5)
  images, labels = separable_batch(np.random.default_rng(0), 8, 3)
  losses, cosines = {}, {}
  for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
    step = lora_method.make_train_step(lora_method.StepConfig(TINY, lora_config, dtype=dtype),
                                       optimizer)
    state = lora_method.init_state(0, lora.init(jax.random.PRNGKey(0), TINY, lora_config), optimizer)
    state, m = step(state, base, images, labels, prompts.pack_prompts(ids))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["lora"]))
    losses[name] = float(m["loss"])
    cosines[name] = model.cosine_logits(model.encode_images(base, images, TINY, dtype=dtype),
                                        model.encode_texts(base, ids, TINY, dtype=dtype), 1.0)
  # bf16 keeps 8 bits of mantissa: cosines agree to a few 1e-3 (2^-8 = 3.9e-3), so the loss of
  # logits 100 * cos to a few hundredths.
  np.testing.assert_allclose(cosines["bf16"], cosines["f32"], rtol=0, atol=5e-3)
  assert losses["bf16"] == pytest.approx(losses["f32"], abs=0.05)


def test_packed_prompts_give_the_unpacked_loss_and_gradients():
  """Prompts packed side by side in rows (prompts.pack_prompts) = one padded batch."""
  base = model.init_params(jax.random.key(0), TINY)
  lora_config = lora.LoRAConfig(rank=2, dropout=0.0)
  ends = np.array([3, 7, 2, 5, 4, 6, 3])
  ids = np.zeros((7, 12), np.int32)
  ids[:, 0], ids[:, 1:11] = 49406, 320
  for row, end in enumerate(ends):
    ids[row, end], ids[row, end + 1:] = 49407, 0
  packed = prompts.pack_prompts(ids, row_length=10, row_multiple=2)
  assert packed.token_ids.shape == (4, 10)  # 37 tokens in 4 rows of 10
  optimizer = optax.sgd(1.0)  # the new adapter is the old one minus the gradient
  adapter = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.PRNGKey(0), TINY, lora_config))
  state = lora_method.init_state(0, adapter, optimizer)
  images, labels = separable_batch(np.random.default_rng(0), 8, 7)
  step = lora_method.make_train_step(lora_method.StepConfig(TINY, lora_config), optimizer)

  def one_step(text):
    new_state, metrics = step(jax.tree.map(jnp.copy, state), base, images, labels, text)
    return new_state["lora"], float(metrics["loss"])

  plain = one_step(prompts.one_per_row(ids))
  packed = one_step(jax.tree.map(jnp.asarray, packed))
  assert packed[1] == pytest.approx(plain[1], rel=1e-6)
  for x, y, a in zip(jax.tree.leaves(packed[0]), jax.tree.leaves(plain[0]),
                     jax.tree.leaves(adapter)):
    np.testing.assert_allclose(x - a, y - a, rtol=1e-4, atol=1e-6)  # the gradients


@pytest.mark.parametrize("key,value,message", [
    ("seed", -1, "config.seed=-1"),
    ("optimizer.learning_rate", 0.0, "learning_rate=0.0: must be a finite number > 0"),
    ("optimizer.learning_rate", float("nan"), "learning_rate=nan"),
    ("optimizer.min_learning_rate", 1.0, "min_learning_rate=1.0"),
    ("optimizer.b2", 1.5, "b2=1.5"),
    ("logit_scale", float("inf"), "logit_scale=inf"),
    ("data_dir", "/nonexistent/tfds", "prepare the dataset there first"),
    ("split_file", "/nonexistent/split_zhou_EuroSAT.json", "split_file='/nonexistent"),
])
def test_numbers_and_paths_no_run_can_use_are_user_errors(key, value, message):
  config = fewshot.get_config()
  config.update_from_flattened_dict({key: value})
  with pytest.raises(UserError, match=message):
    training.validate(config)


def test_training_loss_is_what_the_train_step_differentiates():
  lora_config = lora.LoRAConfig(rank=2, dropout=0.25)
  step_config = lora_method.StepConfig(TINY, lora_config)
  base = model.init_params(jax.random.key(0), TINY)
  adapter = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.PRNGKey(0), TINY, lora_config))
  ids = np.zeros((3, 8), np.int32)
  ids[:, 0], ids[:, 1], ids[:, 2] = 49406, [320, 1125, 539], 49407
  images, labels = separable_batch(np.random.default_rng(0), 8, 3)
  optimizer = optax.sgd(1.0)  # the new adapter is the old one minus the gradient
  state = lora_method.init_state(3, adapter, optimizer)
  rng = jax.random.fold_in(state["rng"], state["step"])  # the step's dropout key

  (loss, logits), grads = jax.value_and_grad(lora_method.training_loss, has_aux=True)(
      adapter, base, images, labels, prompts.pack_prompts(ids), rng, step_config)
  new_state, metrics = lora_method.make_train_step(step_config, optimizer)(
      jax.tree.map(jnp.copy, state), base, images, labels, prompts.pack_prompts(ids))
  assert logits.shape == (8, 3)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
  assert float(metrics["accuracy"]) == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
  for new, old, grad in zip(jax.tree.leaves(new_state["lora"]), jax.tree.leaves(adapter),
                            jax.tree.leaves(grads)):
    np.testing.assert_allclose(old - new, grad, rtol=1e-4, atol=1e-6)
