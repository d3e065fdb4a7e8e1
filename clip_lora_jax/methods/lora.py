"""The LoRA family (CLIP-LoRA, Block-LoRA): the train step and the run of weight-space adapters.

Data flow of `python train.py --config configs/fewshot.py` (CLIP-LoRA; Block-LoRA alike): the
config names a base model (`base.load_base_model`) and a dataset (`data.get_dataset`,
`data.load_few_shot`); an adapter is initialised (`lora.init`); the class prompts are packed
(`prompts.pack_prompts`); `make_train_step` builds one jitted update with donated state whose
loss (`training_loss`) is the cross-entropy of `logit_scale * cos(image, text)` over all class
prompts; the shared loop (`training.fit`) runs it; the final adapter is merged into the base
(`lora.merge`) and evaluated on the test split (`evaluation.evaluate`). The LoRA math itself
(config, init, merge, adapter files) is `clip_lora_jax.lora`, which the model and PEFT interop
use too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clip_lora_jax import base as base_lib
from clip_lora_jax import (checkpoints, data, evaluation, lora, metrics, model, prompts, sharding,
                           training, workdirs)
from clip_lora_jax.errors import UserError

SECTION = "lora"  # The config section of every method of the family.
FORMAT = lora.FORMAT
load_adapter = lora.load_adapter


def lora_config_from(config: ml_collections.ConfigDict) -> lora.LoRAConfig:
  """The adapter config of a run config: `config.lora` read by the class of `config.method`
  (LoRAConfig, or a variant such as BlockLoRAConfig); `matrices` may be given as "q,k,v"."""
  config_class = lora.config_type(config.method)
  if "lora" not in config:
    raise UserError(f"config.method={config.method!r} needs a `lora` section; start from "
                    "configs/fewshot.py or configs/block_lora.py")
  return config_class.from_dict(config.lora.to_dict())



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
  return training.classification_loss(image_emb, text, labels, sc.logit_scale)


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

  def step(state: training.State, base_params, images, labels, text):
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
               optimizer: optax.GradientTransformation) -> training.State:
  """The train state at step 0. `rng` is a raw uint32 key: dropout at step t uses fold_in(rng, t)."""
  return {"step": jnp.zeros((), jnp.int32), "lora": lora_params,
          "opt_state": optimizer.init(lora_params), "rng": jax.random.PRNGKey(seed)}



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
  run = training.start_run(config, workdir, overwrite,
                  check_base=lambda model_config: lora.abstract_init(model_config, lora_config))
  base, spec, mesh, steps = run.base, run.spec, run.mesh, run.steps
  image_size = base.config.vision.image_size
  step_config = StepConfig(base.config, lora_config, config.logit_scale,
                           training.DTYPES[config.dtype], config.remat, config.attention)
  params = jax.device_put(base.params,
                          sharding.params_sharding(base.params, mesh, config.fsdp))

  with training.data_context(config):
    few_shot = run.load_few_shot()
    prompt_ids = prompts.class_prompt_ids(base.tokenizer, spec.class_names, config.template)
    text = _text_input(base, params, prompt_ids, step_config, mesh)

    optimizer = training.make_optimizer(config.optimizer, steps)
    manager = training.checkpoint_manager(workdir, config.keep_checkpoints)
    with sharding.on_host():
      state = init_state(config.seed, lora.init(jax.random.PRNGKey(config.seed), base.config,
                                                lora_config), optimizer)
    state = training.restore_or(manager, sharding.put_replicated(state, mesh))
    train_step = make_train_step(step_config, optimizer, mesh)
    batches = data.train_batches(few_shot, batch_size=config.batch_size, image_size=image_size,
                                 seed=config.seed, start_step=int(state["step"]),
                                 **sharding.process_rows())
    logits_fn = lambda state: evaluation.adapter_logits_fn(
        base.config, params, state["lora"], lora_config, prompt_ids)

    def next_step(state: training.State) -> tuple[training.State, dict[str, jax.Array]]:
      batch = run.place(next(batches))
      return train_step(state, params, batch["image"], batch["label"], text)

    def validation(state: training.State) -> dict[str, float]:
      return evaluation.evaluate(
          logits_fn(state), data.few_shot_eval_batches(few_shot, "val", config.eval_batch_size,
                                                       image_size, **sharding.process_rows()),
          place=run.place, progress=False)

    with metrics.MetricWriter(workdir, enabled=run.lead) as writer:
      state = training.fit(state, next_step, config, manager, writer,
                           training.learning_rate_schedule(config.optimizer, steps), steps,
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


def logits_fn(base: base_lib.BaseModel, adapter: lora.Adapter, class_names: Sequence[str],
              templates: Sequence[str]) -> Callable[[jax.Array], jax.Array]:
  """images -> logits of the base with `adapter` merged in (no added latency), the classes
  embedded by the merged text tower under `templates`."""
  merged = lora.merge(base.params, adapter.lora, adapter.config)
  classifier = evaluation.zero_shot_classifier(merged, base.config, base.tokenizer, class_names,
                                               templates)
  return evaluation.clip_logits_fn(merged, base.config, classifier)


def export_finished(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Adds the merged model to the workdir of a finished run, from its adapter file (no
  retraining); nothing if it is there."""
  if os.path.isdir(os.path.join(workdir, workdirs.MERGED_DIR)):
    return
  adapter = lora.load_adapter(os.path.join(workdir, workdirs.ADAPTER_FILE))
  base = base_lib.load_base_model(config.model, config.random_init, config.seed)
  lora.check_compatible(adapter, base.name, base.config, base.fingerprint)
  export_merged(workdir, base, adapter)
