"""The prompt-learning family (CoOp, CoCoOp, KgCoOp, ProGrad, MaPLe) on a tiny random CLIP: the
prompt layout and its start, Dassl's schedule, and each method learning a small image task
through its own train step. End to end through train.py and eval.py: test_every_method.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clip_lora_jax import base as base_lib
from clip_lora_jax import methods, training
from clip_lora_jax.errors import UserError
from clip_lora_jax import model
from clip_lora_jax.methods import cocoop, coop, kgcoop, maple, prograd, prompt_learning

NAMES = ["cat", "sea or lake", "road", "forest"]


@pytest.fixture(scope="module")
def base():
  return base_lib.load_base_model("tiny", random_init=True)


@pytest.fixture(scope="module")
def images():
  """8 images of 4 classes: each class a fixed random pattern, plus noise; and their labels."""
  rng = np.random.default_rng(0)
  patterns = rng.normal(size=(4, 32, 32, 3))
  labels = np.tile(np.arange(4), 2)
  return (jnp.asarray(patterns[labels] + 0.3 * rng.normal(size=(8, 32, 32, 3)), jnp.float32),
          jnp.asarray(labels, jnp.int32))


def frozen_for(base, method, config):
  """The Frozen inputs of NAMES in the method's layout (zero-shot embeddings where needed)."""
  from clip_lora_jax import evaluation  # pylint: disable=import-outside-toplevel
  zero_shot = None
  if getattr(method, "ZERO_SHOT", False):
    zero_shot = evaluation.zero_shot_classifier(base.params, base.config, base.tokenizer, NAMES,
                                                ("a photo of a {}.",))
  return prompt_learning.make_frozen(base, base.params, NAMES,
                                     prompt_learning.prompt_template(base.tokenizer, config),
                                     zero_shot)


def test_the_layout_and_start_of_the_context(base):
  table = np.asarray(base.params["text"]["token_embedding"]["embedding"])
  words = table[base.tokenizer(["a photo of a"])[0, 1:5]]
  cases = {(16, ""): "X X X X X X X X X X X X X X X X {}.", (4, "a photo of a"): "a photo of a {}.",
           (6, "a photo of a"): "X X a photo of a {}.", (2, "a photo of a"): "a photo of a {}."}
  for (n_ctx, init), template in cases.items():
    config = coop.Config(n_ctx=n_ctx, init=init)
    assert prompt_learning.prompt_template(base.tokenizer, config) == template
    ctx = np.asarray(prompt_learning.init_context(jax.random.key(0), base, config))
    assert ctx.shape == (n_ctx, base.config.text.width)
    if not init:
      assert abs(ctx.std() - 0.02) < 0.002
    elif n_ctx >= 4:  # zeros, then the words (ProGrad's rule; CoOp's when n_ctx = 4)
      np.testing.assert_array_equal(ctx, np.concatenate([np.zeros((n_ctx - 4, 48)), words]))
    else:  # the first words learned, the rest kept as text (MaPLe)
      np.testing.assert_array_equal(ctx, words[:n_ctx])
  with pytest.raises(UserError, match="coop.n_ctx=0: must be a positive integer"):
    coop.Config(n_ctx=0)
  with pytest.raises(UserError, match=r"unknown coop option\(s\) \['ctx'\]"):
    coop.Config.from_dict({"ctx": 4})


def test_dassl_schedule_warms_up_one_epoch_then_restarts_the_cosine():
  optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, min_learning_rate=0.0, schedule="dassl", warmup_epochs=1,
      warmup_learning_rate=1e-5))
  schedule = training.learning_rate_schedule(optimizer, 5 * 3, steps_per_epoch=3)
  got = [float(schedule(step)) for step in range(15)]
  # Dassl (warmup_recount): epoch 0 at 1e-5, then epoch e at the cosine's value at e - 1 of 5.
  cosine = [1e-3 * (1 + np.cos(np.pi * e / 5)) for e in range(4)]
  np.testing.assert_allclose(got, np.repeat([1e-5, *cosine], 3), rtol=1e-6)
  from configs import coop as coop_config  # pylint: disable=import-outside-toplevel
  config = coop_config.get_config()
  training.validate(config)
  config.optimizer.warmup_epochs = -1
  with pytest.raises(UserError, match="config.optimizer.warmup_epochs=-1: must be an integer"):
    training.validate(config)


def test_configs_follow_the_official_recipes():
  from configs import coop as coop_config  # pylint: disable=import-outside-toplevel
  c = coop_config.get_config("dataset=dtd,shots=8")
  assert (c.coop.n_ctx, c.coop.init, c.epochs, c.batch_size) == (16, "", 200, 32)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum,
          c.optimizer.weight_decay, c.optimizer.warmup_epochs) == ("sgd", 2e-3, 0.9, 5e-4, 1)
  c = coop_config.get_config("dataset=imagenet,shots=16,ctx=4")
  assert (c.coop.n_ctx, c.coop.init, c.epochs) == (4, "a photo of a", 50)
  assert [coop_config.get_config(f"shots={k}").epochs for k in (1, 2, 4, 8, 16)] == [
      50, 100, 100, 200, 200]


def numpy_projection(g, g_kl, lam):
  """ProGrad's official update (trainers/prograd.py), in numpy float64."""
  g, g_kl = np.asarray(g, np.float64), np.asarray(g_kl, np.float64)
  u = g_kl / np.linalg.norm(g_kl)
  if np.dot((g / np.linalg.norm(g)).ravel(), u.ravel()) < 0:
    return g - lam * np.dot(g.ravel(), u.ravel()) * u
  return g


def test_prograd_projection_matches_numpy():
  rng = np.random.default_rng(0)
  for trial in range(6):
    g, g_kl = rng.normal(size=(2, 4, 8))
    if trial % 2:
      g_kl = -g_kl if np.vdot(g, g_kl) > 0 else g_kl  # a conflict
    for lam in (1.0, 0.8):
      np.testing.assert_allclose(prograd.project(jnp.asarray(g), jnp.asarray(g_kl), lam),
                                 numpy_projection(g, g_kl, lam), rtol=1e-5, atol=1e-6)
  g = rng.normal(size=(4, 8))
  np.testing.assert_array_equal(prograd.project(g, np.zeros_like(g), 1.0), g.astype(np.float32))


def test_prograd_gradients_are_the_projected_cross_entropy_gradient(base, images):
  config = prograd.Config()
  frozen = frozen_for(base, prograd, config)  # a teacher that is wrong on every class:
  frozen = frozen.replace(zero_shot=jnp.roll(frozen.zero_shot, 1, axis=0))
  params = prograd.init(jax.random.key(0), base, config)
  params = {"ctx": params["ctx"] + 0.05 * jax.random.normal(jax.random.key(1),
                                                            params["ctx"].shape)}
  (ce, _), got = jax.jit(prograd.gradients, static_argnums=4)(params, frozen, *images, config)

  @jax.jit
  def reference(params):  # the two gradients, each of its own loss
    image = prompt_learning.encode_images(frozen, images[0])
    scores = lambda p: 100.0 * image @ coop.text_features(p, frozen, config).T
    teacher = jax.nn.softmax(100.0 * image @ frozen.zero_shot.T)
    ce = lambda p: prompt_learning.cross_entropy(scores(p), images[1])
    kl = lambda p: jnp.mean(jnp.sum(-teacher * jax.nn.log_softmax(scores(p)), -1))
    return ce(params), jax.grad(ce)(params)["ctx"], jax.grad(kl)(params)["ctx"]

  expected_ce, g, g_kl = reference(params)
  assert np.vdot(g, g_kl) < 0  # this start conflicts: the projection acts
  np.testing.assert_allclose(got["ctx"], numpy_projection(g, g_kl, 1.0), rtol=0,
                             atol=1e-4 * np.abs(g).max())
  assert float(ce) == pytest.approx(float(expected_ce), rel=1e-5)


def test_kgcoop_adds_lambda_times_one_minus_the_mean_cosine(base, images):
  config = kgcoop.Config()
  frozen = frozen_for(base, kgcoop, config)
  ctx = kgcoop.init(jax.random.key(0), base, config)["ctx"]
  params = {"ctx": ctx + 0.5 * jax.random.normal(jax.random.key(1), ctx.shape)}
  value, scores = kgcoop.loss(params, frozen, *images, config)
  text = np.asarray(kgcoop.text_features(params, frozen, config))
  cos = np.sum(text * np.asarray(frozen.zero_shot), -1)
  expected = float(prompt_learning.cross_entropy(scores, images[1])) + 8.0 * (1 - cos.mean())
  assert float(value) == pytest.approx(expected, rel=1e-5)
  assert 1 - cos.mean() > 1e-3


def test_prograd_lambda_follows_the_official_configs():
  from configs import prograd as prograd_config  # pylint: disable=import-outside-toplevel
  lam = lambda arg: prograd_config.get_config(arg).prograd.lam
  assert [lam("dataset=dtd,shots=4"), lam("dataset=dtd,shots=8"),
          lam("dataset=oxford_flowers,shots=16"), lam("dataset=caltech101,shots=16")] == [
              1.0, 0.8, 0.8, 1.0]
  with pytest.raises(UserError, match=r"prograd.lam=1.5: must be a number in \[0, 1\]"):
    prograd.Config(lam=1.5)
  with pytest.raises(UserError, match="kgcoop.lam=-1: must be a finite number >= 0"):
    kgcoop.Config(lam=-1)


def test_cocoop_batched_step_equals_the_per_image_loop(base, images):
  """Loss and gradient of a batch of 5 (chunks of 2: a scan over vmapped chunks, and a
  remainder) against the official way: each image alone through the text tower, averaged."""
  config = cocoop.Config(images_per_pass=2)
  frozen = frozen_for(base, cocoop, config)
  params = cocoop.init(jax.random.key(0), base, config)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p, x, y: prompt_learning.loss(cocoop, p, frozen, x, y, config)[0]))
  batch, labels = images[0][:5], images[1][:5]
  value, grads = value_and_grad(params, batch, labels)
  each = [value_and_grad(params, batch[i:i + 1], labels[i:i + 1]) for i in range(5)]
  assert float(value) == pytest.approx(np.mean([float(v) for v, _ in each]), rel=1e-5)
  mean_grads = jax.tree.map(lambda *g: np.mean(g, axis=0), *[g for _, g in each])
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_grads)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert np.abs(grads["meta_net"]["linear1"]["kernel"]).max() > 0
  with pytest.raises(UserError, match="cocoop.images_per_pass=0: must be a positive integer"):
    cocoop.Config(images_per_pass=0)


def test_maple_parameters_and_vision_prompts():
  """3.55M parameters for ViT-B/16 (the paper's count); the vision prompts are the text ones
  through their own linear maps, the J - 1 deep maps starting equal (the official clones)."""
  vit = base_lib.BaseModel("ViT-B/16", model.get_config("ViT-B/16"), None, None)
  shapes = jax.eval_shape(lambda: maple.init(jax.random.key(0), vit, maple.Config(init="")))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 3_555_072
  assert shapes["deep"].shape == (8, 2, 512) and shapes["deep_proj"]["kernel"].shape == (
      8, 512, 768)
  params = jax.tree.map(np.asarray, maple.init(jax.random.key(0), base_lib.BaseModel(
      "tiny-12", model.get_config("tiny-12"), None, None), maple.Config(init="", depth=4)))
  np.testing.assert_array_equal(params["deep_proj"]["kernel"][0], params["deep_proj"]["kernel"][2])
  prompts_ = maple.vision_prompts(params)
  np.testing.assert_allclose(prompts_.tokens, params["ctx"] @ params["proj"]["kernel"]
                             + params["proj"]["bias"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(prompts_.deep[1], params["deep"][1] @ params["deep_proj"]["kernel"][1]
                             + params["deep_proj"]["bias"][1], rtol=1e-6, atol=1e-6)
  assert "deep" not in maple.init(jax.random.key(0), vit, maple.Config(init="", depth=1))
  with pytest.raises(UserError, match="maple.depth=9: the base has 2 blocks per tower"):
    maple.Config().check_model(model.get_config("tiny"))


# Settings of the learning test: CoOp's 4-token variant, and KgCoOp's guidance weakened (at 8 it
# holds the tiny model near its zero-shot prompts, whose accuracy is chance).
LEARNERS = {"coop": {"n_ctx": 4}, "kgcoop": {"lam": 1.0}, "prograd": {}, "cocoop": {},
             "maple": {"depth": 2}}


@pytest.mark.parametrize("name", LEARNERS)
def test_each_method_learns_a_small_task(base, images, name):
  """Adam at 0.03 (the recipes' SGD at 0.002 needs many epochs): a tiny random CLIP maps the
  4 classes' images to nearby embeddings, which the learned prompts must tell apart."""
  method = methods.get(name)
  config = methods.get(name).Config(**LEARNERS[name])
  frozen = frozen_for(base, method, config)
  params = method.init(jax.random.key(0), base, config)
  optimizer = optax.adam(0.03)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
  step = prompt_learning.make_train_step(method, config, optimizer)
  losses = []
  for _ in range(80):
    state, step_metrics = step(state, frozen, *images)
    losses.append(float(step_metrics["loss"]))
  assert np.isfinite(losses).all()
  # Less than half its start and still falling; the batch mostly right (chance: 1/4).
  assert losses[-1] < 0.5 * losses[0] and losses[-1] < losses[-10], losses
  assert float(step_metrics["accuracy"]) >= 0.75


def test_the_prompt_methods_benchmark_runs(tmp_path):
  """Its prompt-learning rows (the CLIP-LoRA row is `benchmarks.train_step`'s step, which
  tests/test_gpu_benchmark.py runs: 10 s more of compilation here)."""
  from benchmarks import prompt_methods  # pylint: disable=import-outside-toplevel
  rows = prompt_methods.main(["--shape", "tiny", "--batch", "2", "--classes", "3", "--steps", "1",
                              "--warmup", "0", "--methods", "coop,maple",
                              "--json", str(tmp_path / "rows.json")])
  assert [row["method"] for row in rows] == ["coop", "maple"]
  assert all(row["step_s"] > 0 and np.isfinite(row["loss"]) for row in rows)
  assert rows[0]["trainable"] == 16 * 48 and (tmp_path / "rows.json").exists()
