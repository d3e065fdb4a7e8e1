"""The run shared by every method that trains on frozen CLIP features (the feature-cache family:
zero-shot CLIP, linear probe, LP++, CLAP, Tip-Adapter(-F), CLIP-Adapter, TaskRes, ProLIP, GDA).

A method of the family is a module with pure functions over its parameter pytree:

  SECTION = NAME                          its config section, `config.<NAME>`
  Config                                  a frozen `MethodConfig` dataclass of its settings
  INPUT = "embedding" | "features"        unnormalised image embeddings, or the pooled image
                                          features before the visual projection (ProLIP)
  init(task, config) -> params            the start of training, or the closed-form solution
  logits(params, x, config) -> (B, C)     class scores of inputs x
  loss(params, x, labels, config) -> (loss, logits)      only methods that train
  select(params, task, config) -> params                 optional: hyper-parameters searched on
                                                          the validation shots after training
  CLASSIFIER = "unit" | "raw_mean"        optional: `task.classifier` is CLIP's unit template
                                          ensemble (the default), or the mean of the templates'
                                          unnormalised text embeddings (TaskRes's base)

The parameters are one pytree; its entry "frozen" (if any) holds arrays that inference needs
but training leaves alone (the zero-shot classifier, a cache's values, hyper-parameters): the
optimizer, its weight decay and the gradient see the rest only.

and three lines that hand the rest to this module (`train_and_evaluate = run`, `load_adapter`,
`logits_fn`). The run: the frozen features of `config.views` augmented views of the few-shot
images, of the clean shots and of the validation shots are computed once and cached
(`clip_lora_jax.features`); the zero-shot classifier of `config.templates` is built; `init`;
when the method trains (a `loss`, and parameters outside "frozen"), the shared loop
(`training.fit`: checkpoints, resume, metrics) runs `config.epochs` epochs of `loss` on batches of cached views (with `config.select_epoch`,
the epoch whose parameters score best on the validation shots is kept); `select`; the adapter (every
array that inference needs, the zero-shot classifier included) is written and scored on the
test split. Hyper-parameter searches see the validation shots only, never the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from clip_lora_jax import base as base_lib
from clip_lora_jax import (data, evaluation, features, files, lora, metrics, model, sharding,
                           training, workdirs)
from clip_lora_jax.data import train_input
from clip_lora_jax.errors import UserError

INPUTS = ("embedding", "features")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Base of the methods' settings: read from a config section or an adapter file."""

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
    """From a plain dict; an unknown key is refused by name."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
      raise UserError(f"unknown {cls.__module__.rsplit('.', 1)[-1]} option(s) {unknown}; "
                      f"known: {names}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Task:
  """What a feature-cache method learns from; arrays are float32 numpy.

  views, view_labels: `config.views` augmented views of every training shot, (V x N, D), and
    view_shots: the shot (row of `shots`) each view is of;
  shots, shot_labels: the clean (test-preprocessed) training shots, (N, D);
  val, val_labels: the validation shots, (M, D), M = 0 when there are none;
  classifier: (C, E) zero-shot class embeddings, unit unless the method's CLASSIFIER is
    "raw_mean"; projection: (W, E) visual projection.
  D is E (embeddings) or W (pooled features) as the method's INPUT says.
  """
  views: np.ndarray
  view_labels: np.ndarray
  view_shots: np.ndarray
  shots: np.ndarray
  shot_labels: np.ndarray
  val: np.ndarray
  val_labels: np.ndarray
  classifier: np.ndarray
  projection: np.ndarray

  @property
  def num_classes(self) -> int:
    return self.classifier.shape[0]


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A trained feature-cache adapter: everything inference needs (`params`), its settings, the
  identity of its base, the few-shot data and the prompt templates of its classifier."""
  method: str
  params: model.Params
  config: MethodConfig
  base_name: str
  base_config: model.CLIPConfig
  base_fingerprint: str
  few_shot: dict[str, Any] | None
  templates: tuple[str, ...]

  @property
  def template(self) -> str | None:
    """The one template of the classifier (None for an ensemble)."""
    return self.templates[0] if len(self.templates) == 1 else None


def file_format(method: str) -> str:
  return f"clip_lora_jax.{method}/1"


def save_adapter(path: str, adapter: Adapter) -> None:
  """One safetensors file: the parameter arrays, the settings and the base identity (atomic)."""
  tensors = {k: np.asarray(v, np.float32)
             for k, v in traverse_util.flatten_dict(adapter.params, sep=".").items()}
  metadata = {"format": file_format(adapter.method), "method": adapter.method,
              "method_config": json.dumps(adapter.config.to_dict()),
              "templates": json.dumps(list(adapter.templates)),
              **lora.base_metadata(adapter.base_name, adapter.base_config,
                                   adapter.base_fingerprint),
              **lora.few_shot_metadata(adapter.few_shot)}
  files.write_safetensors(path, tensors, metadata)


def load_adapter(path: str) -> Adapter:
  """Reads a file written by `save_adapter`."""
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel  (cycle)
  tensors, metadata = files.read_safetensors(path)
  method = metadata.get("method", "")
  if metadata.get("format") != file_format(method) or "method_config" not in metadata:
    raise UserError(f"{path!r} is not a feature-cache adapter file (format "
                    f"{metadata.get('format')!r})")
  config = methods.get(method).Config.from_dict(json.loads(metadata["method_config"]))
  params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(tensors, sep="."))
  return Adapter(method, params, config, *lora.base_from_metadata(metadata),
                 lora.few_shot_from_metadata(metadata),
                 tuple(json.loads(metadata.get("templates", "[]"))))


FROZEN = "frozen"


def trainable(params: model.Params) -> model.Params:
  """The parameters training changes: all but the "frozen" entry."""
  return {k: v for k, v in params.items() if k != FROZEN}


def num_parameters(params: model.Params) -> int:
  """Trainable parameter count."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable(params)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _image_logits(base_params: model.Params, model_config: model.CLIPConfig, method: ModuleType,
                  config: MethodConfig, params: model.Params, images: jax.Array) -> jax.Array:
  x = model.encode_image_features(base_params, images, model_config)
  if method.INPUT == "embedding":
    x = model.project_images(base_params, x)
  return method.logits(params, x, config)


def image_logits_fn(method: ModuleType, base_params: model.Params,
                    model_config: model.CLIPConfig,
                    adapter: Adapter) -> Callable[[jax.Array], jax.Array]:
  """images -> the adapter's class scores (one compiled program)."""
  return functools.partial(_image_logits, base_params, model_config, method, adapter.config,
                           adapter.params)


def logits_fn(base: base_lib.BaseModel, adapter: Adapter, class_names: Sequence[str],
              templates: Sequence[str]) -> Callable[[jax.Array], jax.Array]:
  """images -> class scores of a feature-cache adapter on `base`. Its classes are those it was
  trained on (its classifier is in the file): `class_names` must have as many, and `templates`
  are unused."""
  del templates
  count = num_classes(base, adapter)
  if count != len(class_names):
    raise UserError(f"the {adapter.method!r} adapter scores {count} classes and the "
                    f"dataset has {len(class_names)}: evaluate it on the dataset it was trained "
                    f"on ({(adapter.few_shot or {}).get('dataset', 'unknown')})")
  return _scores(base, adapter)


def _scores(base: base_lib.BaseModel, adapter: Adapter) -> Callable[[jax.Array], jax.Array]:
  """images -> the adapter's class scores on `base`."""
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel  (cycle)
  return image_logits_fn(methods.get(adapter.method), base.params, base.config, adapter)


def num_classes(base: base_lib.BaseModel, adapter: Adapter) -> int:
  """How many classes the adapter scores: those of the task it was trained on (traced, nothing
  computed)."""
  size = base.config.vision.image_size
  return jax.eval_shape(_scores(base, adapter),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1]


def batch_indices(count: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Rows of training batch `step` (from 0) over `count` rows: epoch e visits every row once in
  an order seeded by (seed, e); a batch of at least `count` rows is the whole set, in order.
  A pure function of its arguments, so a resumed run draws the same batches."""
  if batch_size >= count:
    return np.arange(count)
  positions = step * batch_size + np.arange(batch_size)
  epochs = positions // count
  orders = {e: np.random.default_rng([seed, e]).permutation(count) for e in np.unique(epochs)}
  return np.array([orders[e][p % count] for e, p in zip(epochs, positions)])


def steps_per_epoch(config: ml_collections.ConfigDict, num_classes: int) -> int:
  """Batches in one pass over the training shots (shots x classes rows)."""
  return math.ceil(config.shots * num_classes / config.batch_size)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 in %."""
  return 100.0 * float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


def cross_entropy_loss(logits: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array,
                                                                                 jax.Array]]:
  """The `loss(params, x, labels, config) -> (mean cross-entropy, scores)` of a method whose
  training objective is the plain cross-entropy of its `logits(params, x, config)`."""
  def loss(params: model.Params, x: jax.Array, labels: jax.Array,
           config: MethodConfig) -> tuple[jax.Array, jax.Array]:
    scores = logits(params, x, config)
    return optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean(), scores
  return loss


def make_train_step(method: ModuleType, config: MethodConfig,
                    optimizer: optax.GradientTransformation) -> Callable:
  """A jitted `(state, x, labels) -> (state, metrics)` of `method.loss` with respect to the
  trainable parameters (`state["params"]`; `state["frozen"]` is an argument), donated state."""
  def loss(params, frozen, x, labels):
    return method.loss({**params, **({FROZEN: frozen} if frozen else {})}, x, labels, config)

  def step(state, frozen, x, labels):
    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(
        state["params"], frozen, x, labels)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return ({**state, "step": state["step"] + 1, "opt_state": opt_state,
             "params": optax.apply_updates(state["params"], updates)},
            {"loss": value, "accuracy": (jnp.argmax(logits, -1) == labels).mean()})
  return jax.jit(step, donate_argnums=(0,))


def method_config_from(method: ModuleType, config: ml_collections.ConfigDict) -> MethodConfig:
  """The method's settings from its config section."""
  if method.SECTION not in config:
    raise UserError(f"config.method={config.method!r} needs a `{method.SECTION}` section; start "
                    f"from configs/{config.method}.py")
  return method.Config.from_dict(config[method.SECTION].to_dict())


def load_task(run: training.Run, params: model.Params, method: ModuleType,
              templates: Sequence[str]) -> Task:
  """The run's few-shot features (cached) and zero-shot classifier."""
  config, base = run.config, run.base
  few_shot = run.load_few_shot()
  feats = features.few_shot_features(params, base.config, base.fingerprint, few_shot,
                                     config.views, config.seed, config.eval_batch_size, run.mesh,
                                     config.cache_dir, projected=method.INPUT == "embedding")
  classifier = evaluation.zero_shot_classifier(
      params, base.config, base.tokenizer, run.spec.class_names, templates,
      unit=getattr(method, "CLASSIFIER", "unit") == "unit")
  count = len(feats["shots"])
  view_shots = np.concatenate([train_input.epoch_order(count, config.seed, epoch)
                               for epoch in range(config.views)])
  width = feats["shots"].shape[-1]
  return Task(feats["views"], feats["view_labels"], view_shots, feats["shots"],
              feats["shot_labels"], feats.get("val", np.zeros((0, width), np.float32)),
              feats.get("val_labels", np.zeros((0,), np.int32)),
              np.asarray(classifier, np.float32),
              np.asarray(base.params["visual_projection"]["kernel"], np.float32))


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False
        ) -> dict[str, Any]:
  """Trains (or solves) `config.method`, a feature-cache method, as the module docstring says;
  returns and (on process 0) writes `results.json` with its test top-1 / top-5."""
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel  (cycle)
  method = methods.get(config.method)
  method_config = method_config_from(method, config)
  if config.views <= 0:
    raise UserError(f"config.views={config.views}: must be a positive integer")
  templates = evaluation.templates(data.get_dataset(config.dataset), config.templates,
                                   config.template)
  trains = hasattr(method, "loss")
  run = training.start_run(config, workdir, overwrite)
  base, mesh = run.base, run.mesh
  params = sharding.put_replicated(base.params, mesh)
  with training.data_context(config):
    task = load_task(run, params, method, templates)
    final = jax.device_get(method.init(task, method_config))
    steps = run.steps if trains and num_parameters(final) else 0  # all frozen: nothing trains
    with metrics.MetricWriter(workdir, enabled=run.lead) as writer:
      if steps:
        final = _fit(run, method, method_config, task, final, writer)
      if hasattr(method, "select"):
        final = method.select(final, task, method_config)
      if len(task.val):
        writer.write(steps, {"val/top1": accuracy(method.logits(final, task.val, method_config),
                                                  task.val_labels)})
      adapter = Adapter(config.method, final, method_config, base.name, base.config,
                        base.fingerprint, run.few_shot, tuple(templates))
      if run.lead:
        save_adapter(os.path.join(workdir, workdirs.ADAPTER_FILE), adapter)
      test = run.test_accuracy(image_logits_fn(method, params, base.config, adapter))
      writer.write(steps, {f"test/{k}": v for k, v in test.items()})
  return run.finish(num_parameters(final), test, steps)


def _fit(run: training.Run, method: ModuleType, method_config: MethodConfig, task: Task,
         params: model.Params, writer: metrics.MetricWriter) -> model.Params:
  """`run.steps` steps of `method.loss` from `params` on batches of cached views, with the
  shared loop (checkpoints, resume); the final parameters, or with `config.select_epoch` those
  of the epoch that scored best on the validation shots (the first of equals)."""
  config, mesh = run.config, run.mesh
  if config.select_epoch and not len(task.val):
    raise UserError("config.select_epoch=True needs validation shots, and this task has none")
  optimizer = training.make_optimizer(config.optimizer, run.steps)
  start, frozen = trainable(params), params.get(FROZEN, {})
  state = {"step": jnp.zeros((), jnp.int32), "params": start,
           "opt_state": optimizer.init(start),
           "best": {"params": start, "top1": jnp.asarray(-1.0, jnp.float32)}}
  manager = training.checkpoint_manager(run.workdir, config.keep_checkpoints)
  state = training.restore_or(manager, sharding.put_replicated(state, mesh))
  frozen = sharding.put_replicated(frozen, mesh)
  train_step = make_train_step(method, method_config, optimizer)
  epoch = steps_per_epoch(config, task.num_classes)
  score = lambda trained: accuracy(
      method.logits({**trained, FROZEN: frozen} if frozen else trained, task.val, method_config),
      task.val_labels)

  def next_step(state):
    rows = batch_indices(len(task.views), config.batch_size, config.seed, int(state["step"]))
    batch = sharding.put_replicated((task.views[rows], task.view_labels[rows]), mesh)
    state, step_metrics = train_step(state, frozen, *batch)
    if config.select_epoch and int(state["step"]) % epoch == 0:
      top1 = score(state["params"])
      if top1 > float(state["best"]["top1"]):
        state = {**state, "best": {"params": jax.tree.map(jnp.copy, state["params"]),
                                   "top1": jnp.asarray(top1, jnp.float32)}}
    return state, step_metrics

  state = training.fit(state, next_step, config, manager, writer,
                       training.learning_rate_schedule(config.optimizer, run.steps), run.steps,
                       desc=f"{config.method} {run.spec.name} {config.shots}-shot",
                       validation=(lambda state: {"top1": score(state["params"])})
                       if len(task.val) else None)
  trained = jax.device_get(state["best"]["params"] if config.select_epoch else state["params"])
  return {**trained, **({FROZEN: jax.device_get(frozen)} if frozen else {})}
