"""Few-shot training: what every method's run shares, and the weight-space adapters' run.

Shared by every method (`methods.TRAINERS`): `start_run` (config, dataset and workdir checks,
device mesh, base model; see `workdirs`), the optimizer and its schedule, `fit` (the loop:
progress, metrics, validation, orbax checkpoints, resume, a stop on a non-finite loss) and
`Run.test_accuracy` / `Run.finish` (results.json).

Data flow of `python train.py --config configs/fewshot.py` (CLIP-LoRA; Block-LoRA alike): the
config names a base model (`base.load_base_model`) and a dataset (`data.get_dataset`,
`data.load_few_shot`); an adapter is initialised (`lora.init`); the class prompts are packed
(`prompts.pack_prompts`); `make_train_step` builds one jitted update with donated state whose
loss (`training_loss`) is the cross-entropy of `logit_scale * cos(image, text)` over all class
prompts; the final adapter is merged into the base (`lora.merge`) and evaluated on the test split
(`evaluation.evaluate`).
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
from clip_lora_jax import (checkpoints, data, evaluation, files, lora, metrics, model, prompts,
                           sharding, workdirs)
from clip_lora_jax.errors import Interrupted, UserError

State = dict[str, Any]  # {'step', 'lora', 'opt_state', 'rng'}: all arrays, checkpointed as is.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def lora_config_from(config: ml_collections.ConfigDict) -> lora.LoRAConfig:
  """The adapter config of a run config: `config.lora` read by the class of `config.method`
  (LoRAConfig, or a variant such as BlockLoRAConfig); `matrices` may be given as "q,k,v"."""
  config_class = lora.config_type(config.method)
  if "lora" not in config:
    raise UserError(f"config.method={config.method!r} needs a `lora` section; start from "
                    "configs/fewshot.py or configs/block_lora.py")
  return config_class.from_dict(config.lora.to_dict())


def total_steps(config: ml_collections.ConfigDict) -> int:
  """`total_steps` if set, else `iterations_per_shot x shots` (500 x shots in the reference)."""
  return config.total_steps if config.get("total_steps") else config.iterations_per_shot * config.shots


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for values no run can use (before anything is loaded or written)."""
  positive = {"shots": config.shots, "batch_size": config.batch_size,
              "iterations_per_shot": config.iterations_per_shot,
              "checkpoint_every": config.checkpoint_every, "log_every": config.log_every,
              "eval_batch_size": config.eval_batch_size, "keep_checkpoints": config.keep_checkpoints}
  if config.get("total_steps") is not None:
    positive["total_steps"] = config.total_steps
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
  numbers = [("optimizer.learning_rate", o.learning_rate, o.learning_rate > 0, "> 0"),
             ("optimizer.min_learning_rate", o.min_learning_rate,
              0 <= o.min_learning_rate <= o.learning_rate, "in [0, learning_rate]"),
             ("optimizer.b1", o.b1, 0 <= o.b1 < 1, "in [0, 1)"),
             ("optimizer.b2", o.b2, 0 <= o.b2 < 1, "in [0, 1)"),
             ("optimizer.eps", o.eps, o.eps > 0, "> 0"),
             ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
             ("logit_scale", config.logit_scale, config.logit_scale > 0, "> 0")]
  for key, value, fits, bound in numbers:
    if not (math.isfinite(value) and fits):
      raise UserError(f"config.{key}={value}: must be a finite number {bound}")
  if config.get("data_dir") is not None and not os.path.isdir(os.path.expanduser(config.data_dir)):
    raise UserError(f"config.data_dir={config.data_dir!r} is not a directory; prepare the dataset "
                    f"there first: python -m clip_lora_jax.data prepare {config.dataset} "
                    f"--data_dir {config.data_dir}")
  if config.get("split_file") is not None and not os.path.isfile(config.split_file):
    raise UserError(f"config.split_file={config.split_file!r} is not a file")


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Cosine from `learning_rate` to `min_learning_rate` over `steps`, no warm-up: the value at
  step t is min + (max - min) * (1 + cos(pi t / steps)) / 2, as torch's CosineAnnealingLR."""
  return optax.cosine_decay_schedule(optimizer.learning_rate, steps,
                                     alpha=optimizer.min_learning_rate / optimizer.learning_rate)


def make_optimizer(optimizer: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """AdamW with decoupled weight decay (torch.optim.AdamW's update) on the schedule above."""
  return optax.adamw(learning_rate_schedule(optimizer, steps), b1=optimizer.b1, b2=optimizer.b2,
                     eps=optimizer.eps, weight_decay=optimizer.weight_decay)


def classification_loss(image_emb: jax.Array, text_emb: jax.Array, labels: jax.Array,
                        logit_scale: float) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of the logits logit_scale * cos(image, text), and those (B, C) logits."""
  logits = model.cosine_logits(image_emb, text_emb, logit_scale)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static about the train step."""
  model_config: model.CLIPConfig
  lora_config: lora.LoRAConfig
  logit_scale: float = 100.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "xla"  # See `model.ATTENTION_IMPLEMENTATIONS`.

  @property
  def text_trains(self) -> bool:
    """Whether the text tower carries LoRA (then prompts are re-encoded every step)."""
    return "text" in lora.ENCODERS[self.lora_config.encoders]


def training_loss(lora_params: model.Params, base_params: model.Params, images: jax.Array,
                  labels: jax.Array, text: jax.Array | prompts.PackedPrompts, rng: jax.Array,
                  step_config: StepConfig) -> tuple[jax.Array, jax.Array]:
  """(loss, (B, C) logits) of an adapter in training mode: what the train step differentiates
  with respect to `lora_params`, for computing gradients or debugging a run.

  Training mode: LoRA dropout is drawn from `rng` (the train step passes fold_in(state rng,
  step)), split between the image and the text tower. `text` is what `make_train_step` takes.
  """
  sc = step_config
  common = dict(lora_scale=sc.lora_config.scale, lora_dropout=sc.lora_config.dropout,
                dtype=sc.dtype, remat=sc.remat, attention=sc.attention)
  image_rng, text_rng = jax.random.split(rng)
  pairs = sc.lora_config.pairs(lora_params)
  image_emb = model.encode_images(base_params, images, sc.model_config, lora=pairs,
                                  dropout_rng=image_rng, **common)
  if sc.text_trains:
    text = prompts.encode_packed(base_params, text, sc.model_config, lora=pairs,
                                 dropout_rng=text_rng, **common)
  return classification_loss(image_emb, text, labels, sc.logit_scale)


def make_train_step(step_config: StepConfig, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """A jitted `(state, base_params, images, labels, text) -> (state, metrics)` with donated state.

  `text` is the class prompts packed (`prompts.PackedPrompts`) when the text tower trains (they
  are encoded with gradients every step); otherwise the (C, E) text embeddings, computed once.
  Gradients of `training_loss` are taken with respect to the LoRA pytree only; base params are
  an argument (not a closure) so they are not baked into the compiled program as constants. With
  a `mesh`, the inputs' shardings drive the partitioning and the new state comes out replicated.

  The state is donated (`donate_argnums=(0,)`): XLA may write the new state into the buffers of
  the one passed in, so a step holds one copy of the LoRA parameters and optimizer moments, not
  two. The arrays of the state passed in must not be used after the call: use the returned
  state (copy it first, `jax.tree.map(jnp.copy, state)`, to keep both). The base params, images
  and text are not donated and can be passed again.
  """
  def loss_fn(lora_params, base_params, images, labels, text, rng):
    loss, logits = training_loss(lora_params, base_params, images, labels, text, rng,
                                 step_config)
    return loss, (jnp.argmax(logits, -1) == labels).mean()

  def step(state: State, base_params, images, labels, text):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["lora"], base_params, images, labels, text, rng)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
    new_state = {**state, "step": state["step"] + 1, "opt_state": opt_state,
                 "lora": optax.apply_updates(state["lora"], updates)}
    return new_state, {"loss": loss, "accuracy": accuracy}

  out_shardings = None if mesh is None else sharding.replicated(mesh)
  return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def init_state(seed: int, lora_params: model.Params,
               optimizer: optax.GradientTransformation) -> State:
  """The train state at step 0. `rng` is a raw uint32 key: dropout at step t uses fold_in(rng, t)."""
  return {"step": jnp.zeros((), jnp.int32), "lora": lora_params,
          "opt_state": optimizer.init(lora_params), "rng": jax.random.PRNGKey(seed)}


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


def _text_input(base: base_lib.BaseModel, params: model.Params, prompt_ids: np.ndarray,
                step_config: StepConfig, mesh: jax.sharding.Mesh
                ) -> jax.Array | prompts.PackedPrompts:
  """What the train step takes as `text`: the class prompts packed (`prompts.pack_prompts`),
  their rows sharded over the mesh, when the text tower trains; else the frozen text
  embeddings."""
  if step_config.text_trains:
    return prompts.shard_packed(prompts.pack_prompts(prompt_ids, row_multiple=mesh.size), mesh)
  encode = jax.jit(lambda p, ids: model.encode_texts(p, ids, base.config, chunk_size=256),
                   out_shardings=sharding.replicated(mesh))
  return encode(params, sharding.put_replicated(prompt_ids, mesh))


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

  def finish(self, trainable_parameters: int, test: dict[str, float]) -> dict[str, Any]:
    """The run's results; written to `results.json` by process 0 (the last file a run writes)."""
    c = self.config
    results = {"method": c.method, "dataset": self.spec.name, "shots": c.shots, "seed": c.seed,
               "model": self.base.name, "steps": self.steps,
               "trainable_parameters": trainable_parameters,
               **{f"test_{k}": v for k, v in test.items()}}
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
    config.sampler = data.resolve_sampler(spec, config.split_file, config.get("sampler"))
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
  return Run(config, workdir, mesh, total_steps(config), base, spec)


def export_merged(workdir: str, base: base_lib.BaseModel, adapter: lora.Adapter) -> None:
  """Writes the merged model in the Hugging Face layout, with the adapter's prompt template, to
  `workdir/merged`, unless it is there: `save_hf` writes it whole or not at all, so it is this
  run's (a run interrupted after writing it, resumed to the same adapter)."""
  directory = os.path.join(workdir, workdirs.MERGED_DIR)
  if not os.path.isdir(directory):
    checkpoints.save_hf(directory, base.config,
                        lora.merge(base.params, adapter.lora, adapter.config),
                        template=adapter.template)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict[str, Any]:
  """Trains a weight-space adapter (CLIP-LoRA, Block-LoRA) as `config` says, resuming from
  `workdir`'s last checkpoint (`overwrite`: replacing the run there); returns and (on process 0)
  writes `results.json` with the test top-1 / top-5 of the merged model."""
  lora_config = lora_config_from(config)
  run = start_run(config, workdir, overwrite,
                  check_base=lambda model_config: lora.abstract_init(model_config, lora_config))
  base, spec, mesh, steps = run.base, run.spec, run.mesh, run.steps
  image_size = base.config.vision.image_size
  step_config = StepConfig(base.config, lora_config, config.logit_scale, DTYPES[config.dtype],
                           config.remat, config.attention)
  params = jax.device_put(base.params,
                          sharding.params_sharding(base.params, mesh, config.fsdp))

  with data_context(config):
    few_shot = data.load_few_shot(spec, config.shots, config.seed, data_dir=config.data_dir,
                                  split_file=config.split_file, cache_dir=config.cache_dir,
                                  sampler=config.sampler)
    prompt_ids = prompts.class_prompt_ids(base.tokenizer, spec.class_names, config.template)
    text = _text_input(base, params, prompt_ids, step_config, mesh)

    optimizer = make_optimizer(config.optimizer, steps)
    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    with sharding.on_host():
      state = init_state(config.seed, lora.init(jax.random.PRNGKey(config.seed), base.config,
                                                lora_config), optimizer)
    state = restore_or(manager, sharding.put_replicated(state, mesh))
    train_step = make_train_step(step_config, optimizer, mesh)
    batches = data.train_batches(few_shot, batch_size=config.batch_size, image_size=image_size,
                                 seed=config.seed, start_step=int(state["step"]),
                                 **sharding.process_rows())
    logits_fn = lambda state: evaluation.adapter_logits_fn(
        base.config, params, state["lora"], lora_config, prompt_ids)

    def next_step(state: State) -> tuple[State, dict[str, jax.Array]]:
      batch = run.place(next(batches))
      return train_step(state, params, batch["image"], batch["label"], text)

    def validation(state: State) -> dict[str, float]:
      return evaluation.evaluate(
          logits_fn(state), data.few_shot_eval_batches(few_shot, "val", config.eval_batch_size,
                                                       image_size, **sharding.process_rows()),
          place=run.place, progress=False)

    with metrics.MetricWriter(workdir, enabled=run.lead) as writer:
      state = fit(state, next_step, config, manager, writer,
                  learning_rate_schedule(config.optimizer, steps), steps,
                  desc=f"{spec.name} {config.shots}-shot", validation=validation)
      adapter = lora.Adapter(jax.device_get(state["lora"]), lora_config, base.name, base.config,
                             base.fingerprint, run.few_shot, config.template)
      if run.lead:
        lora.save_adapter(os.path.join(workdir, workdirs.ADAPTER_FILE), adapter)
        if config.export_merged:
          export_merged(workdir, base, adapter)
      test = run.test_accuracy(logits_fn(state))
      writer.write(steps, {f"test/{k}": v for k, v in test.items()})
  return run.finish(lora.num_parameters(adapter.lora), test)
