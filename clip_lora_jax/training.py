"""What every method's run shares: the config checks, the run's start and end, the optimizer and
its schedule, and the loop.

`start_run` (config, dataset and workdir checks, device mesh, base model; see `workdirs`), the
optimizer and its schedule, `fit` (the loop: progress, metrics, validation, orbax checkpoints,
resume, a stop on a non-finite loss) and `Run.test_accuracy` / `Run.finish` (results.json). The
methods (`clip_lora_jax.methods`) bring their own state, step and loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from clip_lora_jax import base as base_lib
from clip_lora_jax import data, evaluation, files, metrics, model, sharding, workdirs
from clip_lora_jax.errors import Interrupted, UserError

State = dict[str, Any]  # A method's train state ({'step', ...}): all arrays, checkpointed as is.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def total_steps(config: ml_collections.ConfigDict, num_classes: int | None = None) -> int:
  """`total_steps` if set; else `epochs` passes over the shots x classes training rows in
  batches of `batch_size`, for configs that count epochs (the baselines' recipes); else
  `iterations_per_shot x shots` (500 x shots in the CLIP-LoRA reference)."""
  if config.get("total_steps"):
    return config.total_steps
  if config.get("epochs") is not None:
    if num_classes is None:
      raise ValueError("an epoch-counted config needs the number of classes")
    return config.epochs * math.ceil(config.shots * num_classes / config.batch_size)
  return config.iterations_per_shot * config.shots


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for values no run can use (before anything is loaded or written)."""
  positive = {"shots": config.shots, "batch_size": config.batch_size,
              "iterations_per_shot": config.iterations_per_shot,
              "checkpoint_every": config.checkpoint_every, "log_every": config.log_every,
              "eval_batch_size": config.eval_batch_size, "keep_checkpoints": config.keep_checkpoints}
  if config.get("total_steps") is not None:
    positive["total_steps"] = config.total_steps
  if config.get("epochs") is not None and config.epochs < 0:
    raise UserError(f"config.epochs={config.epochs}: must be a non-negative integer")
  for key, value in positive.items():
    if value <= 0:
      raise UserError(f"config.{key}={value}: must be a positive integer")
  if config.seed < 0:
    raise UserError(f"config.seed={config.seed}: must be a non-negative integer")
  if config.dtype not in DTYPES:
    raise UserError(f"config.dtype={config.dtype!r}: use one of {', '.join(DTYPES)}")
  if config.attention not in model.ATTENTION_IMPLEMENTATIONS:
    raise UserError(f"config.attention={config.attention!r}: use one of "
                    f"{', '.join(model.ATTENTION_IMPLEMENTATIONS)}")
  if "{}" not in config.template:
    raise UserError(f"config.template={config.template!r} has no '{{}}' for the class name")
  o = config.optimizer
  if o.get("name", "adamw") not in OPTIMIZERS:
    raise UserError(f"config.optimizer.name={o.name!r}: use one of {', '.join(OPTIMIZERS)}")
  numbers = [("optimizer.learning_rate", o.learning_rate, o.learning_rate > 0, "> 0"),
             ("optimizer.min_learning_rate", o.min_learning_rate,
              0 <= o.min_learning_rate <= o.learning_rate, "in [0, learning_rate]"),
             ("optimizer.b1", o.b1, 0 <= o.b1 < 1, "in [0, 1)"),
             ("optimizer.b2", o.b2, 0 <= o.b2 < 1, "in [0, 1)"),
             ("optimizer.eps", o.eps, o.eps > 0, "> 0"),
             ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
             ("logit_scale", config.logit_scale, config.logit_scale > 0, "> 0")]
  if o.get("schedule", "cosine") not in SCHEDULES:
    raise UserError(f"config.optimizer.schedule={o.schedule!r}: use one of {', '.join(SCHEDULES)}")
  if o.get("schedule") == "dassl":
    warmup = o.get("warmup_epochs")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
      raise UserError(f"config.optimizer.warmup_epochs={warmup!r}: must be an integer >= 0")
    numbers.append(("optimizer.warmup_learning_rate", o.get("warmup_learning_rate", 0.0),
                    o.get("warmup_learning_rate", 0.0) > 0, "> 0"))
  for key, value, fits, bound in numbers:
    if not (math.isfinite(value) and fits):
      raise UserError(f"config.{key}={value}: must be a finite number {bound}")
  if config.get("data_dir") is not None and not os.path.isdir(os.path.expanduser(config.data_dir)):
    raise UserError(f"config.data_dir={config.data_dir!r} is not a directory; prepare the dataset "
                    f"there first: python -m clip_lora_jax.data prepare {config.dataset} "
                    f"--data_dir {config.data_dir}")
  if config.get("split_file") is not None and not os.path.isfile(config.split_file):
    raise UserError(f"config.split_file={config.split_file!r} is not a file")
  if config.get("shot_lists") is not None and not os.path.isdir(config.shot_lists):
    raise UserError(f"config.shot_lists={config.shot_lists!r} is not a directory (one holding "
                    "shot_<K>-seed_<S>.json or .pkl lists of shots)")


SCHEDULES = ("cosine", "dassl")


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, steps: int,
                           steps_per_epoch: int = 1) -> optax.Schedule:
  """`optimizer.schedule`: "cosine" (the default) decays from `learning_rate` to
  `min_learning_rate` over `steps`, no warm-up, stepped every step: the value at step t is
  min + (max - min) * (1 + cos(pi t / steps)) / 2, as torch's CosineAnnealingLR. "dassl" is the
  schedule of the Dassl-based baselines (CoOp and the prompt learners), stepped once an epoch
  of `steps_per_epoch` steps: `warmup_epochs` epochs at the constant `warmup_learning_rate`,
  then the same cosine over all E epochs restarted at the warm-up's end (Dassl's
  ConstantWarmupScheduler with warmup_recount): epoch e >= W has the cosine's value at e - W."""
  if optimizer.get("schedule", "cosine") == "cosine":
    return optax.cosine_decay_schedule(optimizer.learning_rate, steps,
                                       alpha=optimizer.min_learning_rate / optimizer.learning_rate)
  epochs = max(1, -(-steps // steps_per_epoch))
  cosine = optax.cosine_decay_schedule(optimizer.learning_rate, epochs,
                                       alpha=optimizer.min_learning_rate / optimizer.learning_rate)
  warmup = optimizer.warmup_epochs

  def schedule(step):
    epoch = step // steps_per_epoch
    return jnp.where(epoch < warmup, optimizer.warmup_learning_rate, cosine(epoch - warmup))
  return schedule


OPTIMIZERS = ("adamw", "adam", "sgd")


def make_optimizer(optimizer: ml_collections.ConfigDict, steps: int,
                   steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """`optimizer.name` on the schedule above, with torch's update rules: "adamw" (the default)
  decouples the weight decay (torch.optim.AdamW); "adam" and "sgd" add it to the gradient as an
  L2 term (torch.optim.Adam, torch.optim.SGD with `momentum`, as the Dassl-based baselines)."""
  schedule = learning_rate_schedule(optimizer, steps, steps_per_epoch)
  name = optimizer.get("name", "adamw")
  if name == "adamw":
    return optax.adamw(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                       weight_decay=optimizer.weight_decay)
  l2 = optax.add_decayed_weights(optimizer.weight_decay)
  if name == "adam":
    return optax.chain(l2, optax.adam(schedule, b1=optimizer.b1, b2=optimizer.b2,
                                      eps=optimizer.eps))
  return optax.chain(l2, optax.sgd(schedule, momentum=optimizer.get("momentum") or None))


def classification_loss(image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                        logit_scale: float) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of the logits logit_scale * cos(image, text), and those (B, C) logits."""
  logits = model.cosine_logits(image_emb, text_emb, logit_scale)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """orbax manager of the train state under `workdir/checkpoints` (writes are atomic)."""
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_or(manager: ocp.CheckpointManager, state: State) -> State:
  """The latest checkpoint if there is one (a resumed run), else `state`."""
  step = manager.latest_step()
  if step is None:
    return state
  return manager.restore(step, args=ocp.args.StandardRestore(state))


def fit(state: State, next_step: Callable[[State], tuple[State, dict[str, jax.Array]]],
        config: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
        writer: metrics.MetricWriter, schedule: optax.Schedule, steps: int, desc: str,
        validation: Callable[[State], dict[str, float]] | None = None) -> State:
  """The loop every method trains with: `next_step` from `state["step"]` up to `steps`.

  Shows a progress bar (process 0, `config.progress`); every `config.log_every` steps writes the
  mean train metrics, the learning rate and steps/s; every `config.eval_every` steps (if set)
  writes `validation(state)`; saves the state every `config.checkpoint_every` steps and at the
  end, and waits for the writes. `next_step` draws its own batch: batch k is a pure function of
  (seed, k), so a resumed run continues the same sequence; it says so, and drops the metrics
  rows it writes again. A non-finite loss stops the run before the next log or checkpoint (a
  UserError naming the step and the last good checkpoint); Ctrl-C becomes an `Interrupted`.
  """
  start = done = int(state["step"])
  lead = jax.process_index() == 0
  if start and lead:
    print(f"resuming from step {start} of {steps} (checkpoint {manager.directory}/{start})",
          flush=True)
  writer.resume_at(start)
  progress = tqdm.tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True,
                       disable=not (config.progress and lead))
  window: list[dict[str, jax.Array]] = []
  tick = time.perf_counter()
  try:
    for step in range(start + 1, steps + 1):
      state, step_metrics = next_step(state)
      done = step
      window.append(step_metrics)
      progress.update(1)
      if step % config.log_every == 0 or step == steps:
        check_finite(window, step, manager)
        summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        summary.update(learning_rate=float(schedule(step - 1)),
                       steps_per_second=len(window) / (time.perf_counter() - tick))
        writer.write(step, {f"train/{k}": v for k, v in summary.items()})
        progress.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{summary['learning_rate']:.2e}")
        window, tick = [], time.perf_counter()
      if validation and config.eval_every and step % config.eval_every == 0 and step != steps:
        writer.write(step, {f"val/{k}": v for k, v in validation(state).items()})
      if step % config.checkpoint_every == 0 or step == steps:
        check_finite(window, step, manager)
        manager.save(step, args=ocp.args.StandardSave(state))
  except KeyboardInterrupt:
    progress.close()
    manager.wait_until_finished()
    checkpoint = last_checkpoint(manager)
    raise Interrupted(f"interrupted at step {done}; run the same command to resume (from "
                      f"{checkpoint or 'the start: no checkpoint was saved yet'})") from None
  progress.close()
  manager.wait_until_finished()
  return state


def last_checkpoint(manager: ocp.CheckpointManager) -> str | None:
  """'step N, path' of the latest finished checkpoint; None if there is none."""
  manager.wait_until_finished()
  step = manager.latest_step()
  return None if step is None else f"step {step}, {manager.directory}/{step}"


def check_finite(window: list[dict[str, jax.Array]], last_step: int,
                 manager: ocp.CheckpointManager) -> None:
  """Raises a UserError at the first non-finite loss of `window`, the metrics of the steps up to
  `last_step`, naming its step and the last (good) checkpoint: a diverged run stops instead of
  training on to an all-NaN adapter."""
  for offset, step_metrics in enumerate(window):
    loss = float(step_metrics["loss"])
    if not math.isfinite(loss):
      raise UserError(f"the loss is {loss} at step {last_step - len(window) + 1 + offset}: "
                      "training diverged; the last good checkpoint is "
                      f"{last_checkpoint(manager) or 'none: none was saved yet'}. Lower "
                      "config.optimizer.learning_rate or check the data, in another --workdir "
                      "or with --overwrite")


def data_context(config: ml_collections.ConfigDict):
  """`tfds.testing.mock_data` when the config asks for mock data, else nothing."""
  if not config.get("mock_data"):
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds.testing.mock_data(num_examples=config.mock_examples)


@dataclasses.dataclass(frozen=True)
class Run:
  """What every method's run starts from (see `start_run`) and how it ends (`finish`)."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  steps: int
  base: base_lib.BaseModel
  spec: data.DatasetSpec

  @property
  def lead(self) -> bool:
    """Process 0: the one that writes files."""
    return jax.process_index() == 0

  def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a batch -> the global batch, sharded over the mesh."""
    return sharding.global_batch(self.mesh, batch)

  @property
  def few_shot(self) -> dict[str, Any]:
    """The few-shot data of the run, as its adapter file records them."""
    c = self.config
    return {"dataset": self.spec.name, "shots": c.shots, "seed": c.seed, "sampler": c.sampler}

  def load_few_shot(self) -> data.FewShotSet:
    """The run's K-shot training images and validation shots (`data.load_few_shot`)."""
    c = self.config
    return data.load_few_shot(self.spec, c.shots, c.seed, data_dir=c.data_dir,
                              split_file=c.split_file, cache_dir=c.cache_dir, sampler=c.sampler,
                              shot_lists=c.get("shot_lists"))

  def test_accuracy(self, logits_fn: Callable[[jax.Array], jax.Array]) -> dict[str, float]:
    """Top-1 / top-5 of `logits_fn` on the dataset's test split (progress bar on process 0)."""
    c = self.config
    split = dict(data_dir=c.data_dir, split_file=c.split_file)
    return evaluation.evaluate(
        logits_fn,
        data.eval_batches(self.spec, "test", batch_size=c.eval_batch_size,
                          image_size=self.base.config.vision.image_size, **split,
                          **sharding.process_rows()),
        total=data.num_examples(self.spec, "test", **split), place=self.place,
        progress=c.progress and self.lead)

  def finish(self, trainable_parameters: int, test: dict[str, float],
             steps: int | None = None) -> dict[str, Any]:
    """The run's results (`steps` trained: `self.steps` unless given; the accelerator memory
    peak of this process, None on CPU); written to `results.json` by process 0 (the last file a
    run writes)."""
    c = self.config
    results = {"method": c.method, "dataset": self.spec.name, "shots": c.shots, "seed": c.seed,
               "model": self.base.name, "steps": self.steps if steps is None else steps,
               "trainable_parameters": trainable_parameters,
               **{f"test_{k}": v for k, v in test.items()},
               "peak_device_memory_mb": sharding.peak_device_memory_mb()}
    if self.lead:
      files.write_json(os.path.join(self.workdir, workdirs.RESULTS_FILE), results)
    return results


def resolve(config: ml_collections.ConfigDict) -> data.DatasetSpec:
  """Checks `config` (`validate`) and its dataset name, and sets `config.sampler` to the few-shot
  sampler the run uses (`data.resolve_sampler`) and, for a dataset of the user's own images,
  `config.dataset_digest` to the digest of its files (so that a workdir is not resumed on changed
  files): the config a workdir records and compares. Returns the dataset spec."""
  validate(config)
  spec = data.get_dataset(config.dataset, config.get("class_names_file"))
  if config.get("mock_data") and spec.builder_config is not None:
    raise UserError(f"config.mock_data=True would replace {spec.name} by random examples; set "
                    "--config.mock_data=False to train on these images")
  with config.unlocked():
    config.sampler = data.resolve_sampler(spec, config.split_file, config.get("sampler"),
                                          config.get("shot_lists"))
    if spec.builder_config is not None:
      config.dataset_digest = spec.builder_config.name
  return spec


def start_run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
              check_base: Callable[[model.CLIPConfig], Any] | None = None) -> Run:
  """The start every method's `train_and_evaluate` shares: checks the config, the dataset name
  and the workdir (new, or holding this very run unless `overwrite`: `workdirs.check`), makes the
  device mesh, loads the base model, checks that the method's settings fit its architecture
  (`check_base`, raising a UserError), and only then creates the workdir and records the config.
  The config is `resolve`d first.
  """
  spec = resolve(config)
  workdirs.check(config, workdir, overwrite)
  mesh = sharding.make_mesh()
  sharding.check_divisible(config.batch_size, mesh)
  sharding.check_divisible(config.eval_batch_size, mesh)
  base = base_lib.load_base_model(config.model, config.random_init, config.seed)
  if check_base is not None:
    check_base(base.config)
  workdirs.record(config, workdir, overwrite)
  return Run(config, workdir, mesh, total_steps(config, spec.num_classes), base, spec)
