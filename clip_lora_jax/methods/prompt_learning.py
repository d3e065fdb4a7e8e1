"""The run shared by the prompt-learning methods (CoOp, CoCoOp, KgCoOp, ProGrad, MaPLe): learned
prompt tokens go through the frozen CLIP towers (`model.Prompts`), and every step re-encodes all
the class prompts with gradients.

Prompt layout (CoOp's, class token at the end): each class prompt is "[SOS] t_1 .. t_M {class}.
[EOS]", where the M context vectors t replace the token embeddings after the start token. With
`init` words (e.g. "a photo of a", k tokens), the prompt text is `init` preceded by M - k
placeholders "X", so the learned tokens cover the last of them: M = k (CoOp's "ctxv1", CoCoOp,
KgCoOp) starts from the words' embeddings; M > k (ProGrad's 16) starts from zeros then the
words' embeddings; M < k (MaPLe's 2 of "a photo of a") learns the first M words' tokens and
keeps the rest of the text ("[t_1][t_2] of a {class}."). Without `init`, the M vectors are
drawn from N(0, 0.02) and the text is "X X ... X {class}.". The class prompts are tokenized
once, cut at their end token and packed (`clip_lora_jax.prompts`, CLIP-LoRA's exact
truncation and length grouping); the learned tokens are written into the packed rows.

A method of the family is a module with pure functions over its parameter pytree:

  SECTION, Config (a `PromptConfig`)      its config section and settings
  ZERO_SHOT = True                        optional: needs the hand-crafted prompts' unit class
                                          embeddings (`Frozen.zero_shot`, of `config.templates`)
  init(rng, base, config) -> params       the start of training
  text_features(params, frozen, config)   what the classes' side computes once per step (and
                                          once for a whole evaluation)
  logits(params, frozen, images, config, text) -> (B, C)
  loss(params, frozen, images, labels, config) -> (loss, logits)      optional (default:
                                          cross-entropy of `logits`)
  gradients(params, frozen, images, labels, config) -> ((loss, logits), grads)   optional
                                          (ProGrad: the update direction is not a loss gradient)

and three lines handing the rest to this module (`train_and_evaluate = run`, `load_adapter`,
`logits_fn`). The run: the images of every step go through the frozen image tower (CoOp's
random crops and flips, `data.train_batches`); the optimizer is Dassl's (SGD, cosine stepped
once an epoch after a constant warm-up epoch: `training.learning_rate_schedule`); the shared
loop (`training.fit`) trains; the adapter file holds the learned parameters and the prompt
text, and is scored on the test split.

Shared departures from the official code: float32 (the official code runs CLIP in float16);
the logit scale is `config.logit_scale` (100, what CLIP's learned scale is); batches run on
through epoch boundaries instead of dropping the last incomplete one (an epoch is
ceil(shots x classes / batch) steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clip_lora_jax import base as base_lib
from clip_lora_jax import (data, evaluation, metrics, model, prompts, sharding, training,
                           workdirs)
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache
from clip_lora_jax.model import Params, normalize
from clip_lora_jax.tokenizer import Tokenizer

PLACEHOLDER = "X"  # CoOp's placeholder word for a learned token.
INIT_STD = 0.02  # CoOp's N(0, 0.02) context initialisation.


@dataclasses.dataclass(frozen=True)
class PromptConfig(feature_cache.MethodConfig):
  """n_ctx: the number M of learned context tokens. init: words whose token embeddings start
  the context (see the module docstring), "" for N(0, 0.02)."""
  section: ClassVar[str] = "prompt"

  n_ctx: int = 16
  init: str = ""

  def __post_init__(self):
    if isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int) or self.n_ctx <= 0:
      raise UserError(f"{self.section}.n_ctx={self.n_ctx!r}: must be a positive integer")
    if not isinstance(self.init, str):
      raise UserError(f"{self.section}.init={self.init!r}: must be words (a string), or '' "
                      "for a random start")

  def check_model(self, model_config: model.CLIPConfig) -> None:
    """Raises a UserError when the settings do not fit the base architecture."""
    if self.n_ctx + 2 > model_config.text.context_length:
      raise UserError(f"{self.section}.n_ctx={self.n_ctx} leaves no room for a class name in "
                      f"{model_config.text.context_length} tokens")


def _init_tokens(tokenizer: Tokenizer, init: str) -> np.ndarray:
  """The token ids of the `init` words (without start and end tokens)."""
  ids = tokenizer([init])[0]
  return ids[1:int(np.argmax(ids))]


def prompt_template(tokenizer: Tokenizer, config: PromptConfig) -> str:
  """The class prompts' text, '{}' for the class name; its tokens 1..M are learned."""
  init = config.init.strip()
  fill = config.n_ctx - (len(_init_tokens(tokenizer, init)) if init else 0)
  return " ".join([PLACEHOLDER] * max(fill, 0) + ([init] if init else [])) + " {}."


def init_context(rng: jax.Array, base: base_lib.BaseModel, config: PromptConfig) -> jax.Array:
  """(M, text width) starting context: N(0, 0.02), or zeros then the `init` words' token
  embeddings (the first M of them when there are more)."""
  width = base.config.text.width
  init = config.init.strip()
  if not init:
    return INIT_STD * jax.random.normal(rng, (config.n_ctx, width), jnp.float32)
  table = np.asarray(base.params["text"]["token_embedding"]["embedding"], np.float32)
  own = table[_init_tokens(base.tokenizer, init)][:config.n_ctx]
  return jnp.asarray(np.concatenate([np.zeros((config.n_ctx - len(own), width), np.float32),
                                     own]))


def torch_linear(rng: jax.Array, fan_in: int, fan_out: int) -> Params:
  """{'kernel': (in, out), 'bias': (out,)} drawn as torch.nn.Linear's default (kaiming-uniform
  with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)) for both)."""
  bound = 1.0 / math.sqrt(fan_in)
  k1, k2 = jax.random.split(rng)
  return {"kernel": jax.random.uniform(k1, (fan_in, fan_out), jnp.float32, -bound, bound),
          "bias": jax.random.uniform(k2, (fan_out,), jnp.float32, -bound, bound)}


@flax.struct.dataclass
class Frozen:
  """What a method's functions read besides its parameters (a pytree: a jitted argument).

  base: the frozen CLIP parameters; text: the class prompts in the method's layout, packed;
  zero_shot: (C, E) unit class embeddings of the hand-crafted prompts (ZERO_SHOT methods).
  """
  base: Params
  text: prompts.PackedPrompts
  zero_shot: jax.Array | None
  model_config: model.CLIPConfig = flax.struct.field(pytree_node=False)
  scale: float = flax.struct.field(pytree_node=False, default=100.0)
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)
  remat: bool = flax.struct.field(pytree_node=False, default=False)


def encode_classes(frozen: Frozen, text_prompts: model.Prompts) -> jax.Array:
  """(C, E) unit class embeddings of the packed class prompts with `text_prompts` written in."""
  return normalize(prompts.encode_packed(frozen.base, frozen.text, frozen.model_config,
                                         prompts=text_prompts, dtype=frozen.dtype,
                                         remat=frozen.remat))


def encode_images(frozen: Frozen, images: jax.Array,
                  image_prompts: model.Prompts | None = None) -> jax.Array:
  """(B, E) unit image embeddings of the frozen image tower (with `image_prompts`: MaPLe)."""
  return normalize(model.encode_images(frozen.base, images, frozen.model_config,
                                       dtype=frozen.dtype, remat=frozen.remat,
                                       prompts=image_prompts))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss(method: ModuleType, params: Params, frozen: Frozen, images: jax.Array,
         labels: jax.Array, config: PromptConfig) -> tuple[jax.Array, jax.Array]:
  """The method's loss: its own `loss`, else the cross-entropy of its logits."""
  if hasattr(method, "loss"):
    return method.loss(params, frozen, images, labels, config)
  scores = method.logits(params, frozen, images, config,
                         method.text_features(params, frozen, config))
  return cross_entropy(scores, labels), scores


def make_train_step(method: ModuleType, config: PromptConfig,
                    optimizer: optax.GradientTransformation) -> Callable:
  """A jitted `(state, frozen, images, labels) -> (state, metrics)` with donated state: the
  gradient of the method's loss (or the method's own `gradients`) with respect to
  `state["params"]`, then the optimizer."""
  def gradients(params, frozen, images, labels):
    if hasattr(method, "gradients"):
      return method.gradients(params, frozen, images, labels, config)
    return jax.value_and_grad(functools.partial(loss, method), argnums=0, has_aux=True)(
        params, frozen, images, labels, config)

  def step(state, frozen, images, labels):
    (value, scores), grads = gradients(state["params"], frozen, images, labels)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return ({**state, "step": state["step"] + 1, "opt_state": opt_state,
             "params": optax.apply_updates(state["params"], updates)},
            {"loss": value, "accuracy": (jnp.argmax(scores, -1) == labels).mean()})
  return jax.jit(step, donate_argnums=(0,))


def make_frozen(base: base_lib.BaseModel, params: Params, class_names: Sequence[str],
                template: str, zero_shot: jax.Array | None = None, scale: float = 100.0,
                dtype: Any = jnp.float32, remat: bool = False,
                mesh: jax.sharding.Mesh | None = None) -> Frozen:
  """The `Frozen` inputs of `class_names` in the prompt layout `template` (rows sharded over
  `mesh` when given)."""
  packed = prompts.pack_prompts(prompts.class_prompt_ids(base.tokenizer, class_names, template),
                                row_multiple=1 if mesh is None else mesh.size)
  if mesh is not None:
    packed = prompts.shard_packed(packed, mesh)
  return Frozen(params, packed, zero_shot, base.config, scale, dtype, remat)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _text_features(method: ModuleType, config: PromptConfig, params: Params,
                   frozen: Frozen) -> Any:
  return method.text_features(params, frozen, config)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _image_logits(method: ModuleType, config: PromptConfig, params: Params, frozen: Frozen,
                  text: Any, images: jax.Array) -> jax.Array:
  return method.logits(params, frozen, images, config, text)


def image_logits_fn(method: ModuleType, config: PromptConfig, params: Params,
                    frozen: Frozen) -> Callable[[jax.Array], jax.Array]:
  """images -> the method's class scores; the classes' side is computed once."""
  text = _text_features(method, config, params, frozen)
  return functools.partial(_image_logits, method, config, params, frozen, text)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A trained prompt learner: its learned tensors (`params`), settings, the identity of its
  base, its few-shot data and its prompt text (`templates`: one, '{}' for the class name).
  Unlike a feature-cache adapter it scores any class names. Its file is a feature-cache file
  (`feature_cache.save_adapter`: tensors, settings, base identity, templates)."""
  method: str
  params: Params
  config: PromptConfig
  base_name: str
  base_config: model.CLIPConfig
  base_fingerprint: str
  few_shot: dict[str, Any] | None
  templates: tuple[str, ...]

  @property
  def template(self) -> str:
    """The prompt text the learned tokens go into."""
    return self.templates[0]


save_adapter = feature_cache.save_adapter


def load_adapter(path: str) -> Adapter:
  """Reads a file written by `save_adapter`."""
  read = feature_cache.load_adapter(path)
  if len(read.templates) != 1:
    raise UserError(f"{path!r} records {len(read.templates)} prompt texts; a prompt learner's "
                    "file holds one")
  return Adapter(**{f.name: getattr(read, f.name) for f in dataclasses.fields(read)})


def logits_fn(base: base_lib.BaseModel, adapter: Adapter,
              class_names: Sequence[str], templates: Sequence[str]
              ) -> Callable[[jax.Array], jax.Array]:
  """images -> class scores of a prompt-learning adapter on `base`, for any `class_names`: the
  learned tokens go into the adapter's own prompt text (`templates` are unused)."""
  del templates
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel  (cycle)
  frozen = make_frozen(base, base.params, class_names, adapter.template)
  return image_logits_fn(methods.get(adapter.method), adapter.config, adapter.params, frozen)



def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False
        ) -> dict[str, Any]:
  """Trains `config.method`, a prompt-learning method, as the module docstring says; returns
  and (on process 0) writes `results.json` with its test top-1 / top-5."""
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel  (cycle)
  method = methods.get(config.method)
  method_config = feature_cache.method_config_from(method, config)
  templates = evaluation.templates(data.get_dataset(config.dataset, config.get("class_names_file")),
                                   config.templates, config.template)
  run_ = training.start_run(config, workdir, overwrite, check_base=method_config.check_model)
  base, mesh, spec = run_.base, run_.mesh, run_.spec
  params = sharding.put_replicated(base.params, mesh)
  with training.data_context(config):
    few_shot = run_.load_few_shot()
    zero_shot = None
    if getattr(method, "ZERO_SHOT", False):
      zero_shot = evaluation.zero_shot_classifier(params, base.config, base.tokenizer,
                                                  spec.class_names, templates)
    template = prompt_template(base.tokenizer, method_config)
    frozen = make_frozen(base, params, spec.class_names, template, zero_shot, config.logit_scale,
                         training.DTYPES[config.dtype], config.remat, mesh)
    epoch = feature_cache.steps_per_epoch(config, spec.num_classes)
    optimizer = training.make_optimizer(config.optimizer, run_.steps, epoch)
    with sharding.on_host():
      start = method.init(jax.random.PRNGKey(config.seed), base, method_config)
    state = {"step": jnp.zeros((), jnp.int32), "params": start,
             "opt_state": optimizer.init(start)}
    manager = training.checkpoint_manager(workdir, config.keep_checkpoints)
    state = training.restore_or(manager, sharding.put_replicated(state, mesh))
    train_step = make_train_step(method, method_config, optimizer)
    image_size = base.config.vision.image_size
    batches = data.train_batches(few_shot, batch_size=config.batch_size, image_size=image_size,
                                 seed=config.seed, start_step=int(state["step"]),
                                 **sharding.process_rows())

    def next_step(state):
      batch = run_.place(next(batches))
      return train_step(state, frozen, batch["image"], batch["label"])

    def validation(state) -> dict[str, float]:
      return evaluation.evaluate(
          image_logits_fn(method, method_config, state["params"], frozen),
          data.few_shot_eval_batches(few_shot, "val", config.eval_batch_size, image_size,
                                     **sharding.process_rows()),
          place=run_.place, progress=False)

    with metrics.MetricWriter(workdir, enabled=run_.lead) as writer:
      state = training.fit(state, next_step, config, manager, writer,
                           training.learning_rate_schedule(config.optimizer, run_.steps, epoch),
                           run_.steps, desc=f"{config.method} {spec.name} {config.shots}-shot",
                           validation=validation)
      adapter = Adapter(config.method, jax.device_get(state["params"]), method_config, base.name,
                        base.config, base.fingerprint, run_.few_shot, (template,))
      if run_.lead:
        save_adapter(os.path.join(workdir, workdirs.ADAPTER_FILE), adapter)
      test = run_.test_accuracy(image_logits_fn(method, method_config, state["params"], frozen))
      writer.write(run_.steps, {f"test/{k}": v for k, v in test.items()})
  return run_.finish(feature_cache.num_parameters(adapter.params), test)
