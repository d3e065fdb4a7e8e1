"""LLU, Localized Latent Updates (Ibing, Lim & Kobbelt, CVPRW 2023), on frozen CLIP embeddings.

Each adapted modality (image, text) has an affine map f(e) = W e + b of the unit embedding,
initialised to the identity. It is blended in with a locality weight that decays away from the
anchors (the training images' embeddings on the image side, the training class prompts' on the
text side, optionally reduced to cluster centres):

    d(e)  = 1 - clip(max_c cos(e, c), 0, 1)            per sample, over the anchors c
    w(e)  = gamma * exp(lam * d(e))                      not differentiated through
    e'    = normalise(w * normalise(f(e)) + (1 - w) * e)

so an embedding far from every anchor (d = 1) moves by at most 4 * gamma * exp(lam) and unseen
classes keep CLIP's zero-shot predictions. The parameters are one pytree

    {'image': {'w': (E, E), 'b': (E,)}, 'text': {'w': (E, E), 'b': (E,)}}

holding the adapted modalities only. Unlike the paper's code, which takes the maximum similarity
over the whole batch, d is computed for each sample on its own.

`train_and_evaluate` runs the method as train.py does for every method: the frozen embeddings
of `views` augmented views of the few-shot images are computed once (`clip_lora_jax.features`,
cached), the clean shots and the class prompts are the anchors, and the shared loop
(`training.fit`) trains the maps with AdamW on the cached features in seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.cluster.hierarchy
from flax import traverse_util

from clip_lora_jax import base as base_lib
from clip_lora_jax import evaluation, features, files, lora, metrics, model, sharding
from clip_lora_jax import training, workdirs
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache
from clip_lora_jax.model import Params, cosine_logits, normalize

SECTION = "llu"
MODALITIES = {"image": ("image",), "text": ("text",), "both": ("image", "text")}
MODES = ("exp", "dirac")
# 'dirac' treats e as an anchor when d(e) <= this: 25x the float32 rounding of cos(e, e) for
# unit vectors of 512 to 1024 dimensions (4e-7), far below the distance of distinct images.
DIRAC_TOLERANCE = 1e-5
# Similarities decide the locality weight and W = I must map e to itself bit for bit: no
# reduced-precision (TF32 / bf16) matmul passes on accelerators.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LLUConfig:
  """The LLU method and its training knobs.

  gamma: the weight of the update at an anchor, in [0, 1]. lam: the decay rate of the weight
  with the distance to the nearest anchor, <= 0 (lam = 0 updates everywhere alike). mode: 'exp'
  (gamma * exp(lam * d)) or 'dirac' (gamma at the anchors, 0 elsewhere). modalities: 'image',
  'text' or 'both'. image_clusters / text_clusters: the number of anchor centres of each side
  (None keeps every anchor; the paper clusters only beyond 16 shots). regularization: the weight
  of mean((W - I)^2) + mean(b^2) per modality in the loss (untuned). views: augmented views per
  few-shot image whose embeddings form the training set. The optimizer, step count and batch
  size are the run config's, as for every method (configs/llu.py).
  """
  gamma: float = 0.5
  lam: float = -10.0
  mode: str = "exp"
  modalities: str = "both"
  image_clusters: int | None = None
  text_clusters: int | None = None
  regularization: float = 1.0
  views: int = 10

  def __post_init__(self):
    if not 0.0 <= self.gamma <= 1.0:
      raise UserError(f"llu.gamma={self.gamma}: must be in [0, 1]")
    if self.lam > 0.0:
      raise UserError(f"llu.lam={self.lam}: must be <= 0 (the weight decays away from anchors)")
    if self.mode not in MODES:
      raise UserError(f"llu.mode={self.mode!r}: use one of {', '.join(MODES)}")
    if self.modalities not in MODALITIES:
      raise UserError(f"llu.modalities={self.modalities!r}: use one of {', '.join(MODALITIES)}")
    for name in ("image_clusters", "text_clusters"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise UserError(f"llu.{name}={value!r}: use a positive integer or None (every anchor)")
    if self.regularization < 0.0:
      raise UserError(f"llu.regularization={self.regularization}: must be >= 0")
    if self.views <= 0:
      raise UserError(f"llu.views={self.views}: must be a positive integer")

  @property
  def adapted(self) -> tuple[str, ...]:
    """The modalities that get an update, in a fixed order."""
    return MODALITIES[self.modalities]

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LLUConfig":
    """From a plain dict (a config section or an adapter file's metadata)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise UserError(f"unknown LLU option(s) {sorted(unknown)}; known: "
                      f"{[f.name for f in dataclasses.fields(cls)]}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def init(embed_dim: int, config: LLUConfig) -> Params:
  """Identity maps (W = I, b = 0) for the adapted modalities: LLU starts exactly at CLIP."""
  return {m: {"w": jnp.eye(embed_dim, dtype=jnp.float32),
              "b": jnp.zeros((embed_dim,), jnp.float32)}
          for m in config.adapted}


def cluster_anchors(embeddings: np.ndarray, k: int | None) -> np.ndarray:
  """(N, E) embeddings -> (min(k, N), E) unit anchors, on the host.

  Agglomerative clustering with cosine distance and complete linkage, cut into exactly k
  clusters; each centre is the normalised sum of its unit members. k = None, or k >= N, keeps
  every embedding (normalised).
  """
  if k is not None and k <= 0:
    raise UserError(f"clusters={k}: use a positive integer or None (every anchor)")
  x = np.asarray(embeddings, np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  if k is None or k >= len(x):
    return x.astype(np.float32)
  tree = scipy.cluster.hierarchy.linkage(x, method="complete", metric="cosine")
  labels = scipy.cluster.hierarchy.cut_tree(tree, n_clusters=k)[:, 0]
  centres = np.stack([x[labels == c].sum(axis=0) for c in range(k)])
  return (centres / np.linalg.norm(centres, axis=-1, keepdims=True)).astype(np.float32)


def locality_weight(e: jax.Array, anchors: jax.Array, config: LLUConfig) -> jax.Array:
  """(B, E) embeddings, (N, E) anchors -> (B,) blend weights, each from its own sample.

  Computed in float32, and a constant for autodiff: no gradient flows through the weight.
  """
  e, anchors = (normalize(jnp.asarray(x, jnp.float32)) for x in (e, anchors))
  cos = jnp.matmul(e, anchors.T, precision=_PRECISION)
  d = 1.0 - jnp.clip(jnp.max(cos, axis=-1), 0.0, 1.0)
  if config.mode == "dirac":
    w = jnp.where(d <= DIRAC_TOLERANCE, config.gamma, 0.0)
  else:
    w = config.gamma * jnp.exp(config.lam * d)
  return jax.lax.stop_gradient(w)


def update(side_params: Params, e: jax.Array, anchors: jax.Array, config: LLUConfig) -> jax.Array:
  """(B, E) embeddings -> (B, E) unit updated embeddings of one modality."""
  e = normalize(e)
  w = locality_weight(e, anchors, config)[:, None]
  f = normalize(jnp.matmul(e, side_params["w"].T, precision=_PRECISION) + side_params["b"])
  # e + w (f - e) is w f + (1 - w) e, exact when w = 0 or f = e.
  return normalize(e + w * (f - e))


def adapt(params: Params, modality: str, e: jax.Array, anchors: Mapping[str, jax.Array],
          config: LLUConfig) -> jax.Array:
  """Unit embeddings of `modality` ('image' or 'text'), updated when the config adapts it."""
  if modality not in config.adapted:
    return normalize(e)
  return update(params[modality], e, anchors[modality], config)


def logits(params: Params, image_emb: jax.Array, text_emb: jax.Array,
           anchors: Mapping[str, jax.Array], config: LLUConfig, scale: float = 100.0) -> jax.Array:
  """scale * cos(image', text') for every pair: (B, C). `anchors` maps each adapted modality to
  its (N, E) anchors."""
  return cosine_logits(adapt(params, "image", image_emb, anchors, config),
                       adapt(params, "text", text_emb, anchors, config), scale)


def regularizer(params: Params) -> jax.Array:
  """Sum over the adapted modalities of mean((W - I)^2) + mean(b^2)."""
  return sum(jnp.mean((p["w"] - jnp.eye(p["w"].shape[0], dtype=p["w"].dtype)) ** 2)
             + jnp.mean(p["b"] ** 2) for p in params.values())


def loss(params: Params, image_emb: jax.Array, labels: jax.Array, text_emb: jax.Array,
         anchors: Mapping[str, jax.Array], config: LLUConfig) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of the LLU logits plus the weighted regularizer, and the batch accuracy."""
  z = logits(params, image_emb, text_emb, anchors, config)
  ce = optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
  return ce + config.regularization * regularizer(params), (jnp.argmax(z, -1) == labels).mean()


def num_parameters(params: Params) -> int:
  """Trainable parameter count."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


FORMAT = "clip_lora_jax.llu/1"


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A trained LLU adapter with its anchors, the identity of its base, the data it was trained on
  (`lora.few_shot_metadata`) and the prompt template it was trained with (each None in files
  written before it was recorded)."""
  params: Params
  anchors: dict[str, np.ndarray]
  config: LLUConfig
  base_name: str
  base_config: model.CLIPConfig
  base_fingerprint: str
  few_shot: dict[str, Any] | None = None
  template: str | None = None
  method: ClassVar[str] = "llu"


def save_adapter(path: str, adapter: Adapter) -> None:
  """One safetensors file: the maps, the anchors, the config and the base identity (atomic)."""
  tensors = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
      {"params": adapter.params, "anchors": adapter.anchors}, sep=".").items()}
  metadata = {"format": FORMAT, "method": "llu",
              "llu_config": json.dumps(adapter.config.to_dict()),
              **lora.base_metadata(adapter.base_name, adapter.base_config,
                                   adapter.base_fingerprint),
              **lora.few_shot_metadata(adapter.few_shot), **lora.template_metadata(adapter.template)}
  files.write_safetensors(path, tensors, metadata)


def load_adapter(path: str) -> Adapter:
  """Reads a file written by `save_adapter`, checking it holds what its config adapts."""
  tensors, metadata = files.read_safetensors(path)
  if metadata.get("format") != FORMAT:
    raise UserError(f"{path!r} is not an LLU adapter file")
  config = LLUConfig.from_dict(json.loads(metadata["llu_config"]))
  tree = traverse_util.unflatten_dict(tensors, sep=".")
  params, anchors = tree.get("params", {}), tree.get("anchors", {})
  if set(params) != set(config.adapted) or set(anchors) != set(config.adapted):
    raise UserError(f"{path!r}: the file holds maps for {sorted(params)} and anchors for "
                    f"{sorted(anchors)} where its config adapts {list(config.adapted)}")
  return Adapter(jax.tree.map(jnp.asarray, params), anchors, config,
                 *lora.base_from_metadata(metadata), lora.few_shot_from_metadata(metadata),
                 metadata.get("template"))


@functools.partial(jax.jit, static_argnums=(1, 4))
def _image_logits(base_params: Params, model_config: model.CLIPConfig, params: Params,
                  anchors: Mapping[str, jax.Array], config: LLUConfig, classifier: jax.Array,
                  images: jax.Array) -> jax.Array:
  return logits(params, model.encode_images(base_params, images, model_config), classifier,
                anchors, config)


def classifier_logits_fn(base_params: Params, model_config: model.CLIPConfig, adapter: Adapter,
                         classifier: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """images -> LLU logits against the (C, E) class embeddings `classifier` (text side updated
  by the adapter too), for `evaluation.evaluate`."""
  anchors = {k: jnp.asarray(v) for k, v in adapter.anchors.items()}
  return functools.partial(_image_logits, base_params, model_config, adapter.params, anchors,
                           adapter.config, jnp.asarray(classifier))


def logits_fn(base: base_lib.BaseModel, adapter: Adapter, class_names: Sequence[str],
              templates: Sequence[str]) -> Callable[[jax.Array], jax.Array]:
  """images -> LLU logits of `base` with `adapter`, the classes embedded by the base text tower
  under `templates` (then updated by the adapter's text map)."""
  classifier = evaluation.zero_shot_classifier(base.params, base.config, base.tokenizer,
                                               class_names, templates)
  return classifier_logits_fn(base.params, base.config, adapter, classifier)


def make_train_step(config: LLUConfig, optimizer: optax.GradientTransformation) -> Callable:
  """A jitted `(state, image_emb, labels, text_emb, anchors) -> (state, metrics)`, donated state."""
  def step(state, image_emb, labels, text_emb, anchors):
    (value, accuracy), grads = jax.value_and_grad(loss, has_aux=True)(
        state["llu"], image_emb, labels, text_emb, anchors, config)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["llu"])
    return ({"step": state["step"] + 1, "llu": optax.apply_updates(state["llu"], updates),
             "opt_state": opt_state}, {"loss": value, "accuracy": accuracy})
  return jax.jit(step, donate_argnums=(0,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict[str, Any]:
  """Trains LLU as `config` says (resuming from `workdir`'s last checkpoint; `overwrite`:
  replacing the run there); returns and (on process 0) writes `results.json` with the test
  top-1 / top-5 of CLIP with the adapter."""
  if "llu" not in config:
    raise UserError("config.method='llu' needs an `llu` section and LLU's training recipe; "
                    "start from configs/llu.py")
  llu_config = LLUConfig.from_dict(config.llu.to_dict())
  run = training.start_run(config, workdir, overwrite)
  base, mesh = run.base, run.mesh
  params = sharding.put_replicated(base.params, mesh)

  with training.data_context(config):
    few_shot = run.load_few_shot()
    feats = features.few_shot_features(params, base.config, base.fingerprint, few_shot,
                                       llu_config.views, config.seed, config.eval_batch_size,
                                       mesh, config.cache_dir)
    classifier = evaluation.zero_shot_classifier(params, base.config, base.tokenizer,
                                                 run.spec.class_names, (config.template,))
    anchors = {"image": cluster_anchors(feats["shots"], llu_config.image_clusters),
               "text": cluster_anchors(np.asarray(classifier), llu_config.text_clusters)}
    anchors = {m: anchors[m] for m in llu_config.adapted}
    placed_anchors = sharding.put_replicated(anchors, mesh)

    optimizer = training.make_optimizer(config.optimizer, run.steps)
    fresh = init(base.config.embed_dim, llu_config)
    state = {"step": jnp.zeros((), jnp.int32), "llu": fresh, "opt_state": optimizer.init(fresh)}
    manager = training.checkpoint_manager(workdir, config.keep_checkpoints)
    state = training.restore_or(manager, sharding.put_replicated(state, mesh))
    train_step = make_train_step(llu_config, optimizer)

    def next_step(state):
      rows = feature_cache.batch_indices(len(feats["views"]), config.batch_size, config.seed, int(state["step"]))
      batch = sharding.put_replicated((feats["views"][rows], feats["view_labels"][rows]), mesh)
      return train_step(state, *batch, classifier, placed_anchors)

    def validation(state) -> dict[str, float]:
      z = logits(state["llu"], feats["val"], classifier, placed_anchors, llu_config)
      return {"top1": 100.0 * float(np.mean(np.argmax(z, -1) == feats["val_labels"]))}

    with metrics.MetricWriter(workdir, enabled=run.lead) as writer:
      state = training.fit(state, next_step, config, manager, writer,
                           training.learning_rate_schedule(config.optimizer, run.steps), run.steps,
                           desc=f"LLU {run.spec.name} {config.shots}-shot",
                           validation=validation if "val" in feats else None)
      adapter = Adapter(jax.device_get(state["llu"]), anchors, llu_config, base.name, base.config,
                        base.fingerprint, run.few_shot, config.template)
      if run.lead:
        save_adapter(os.path.join(workdir, workdirs.ADAPTER_FILE), adapter)
      test = run.test_accuracy(classifier_logits_fn(params, base.config, adapter, classifier))
      writer.write(run.steps, {f"test/{k}": v for k, v in test.items()})
  return run.finish(num_parameters(adapter.params), test)
