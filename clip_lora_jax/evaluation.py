"""Zero-shot classifiers from class names x templates, and top-1 / top-5 evaluation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from clip_lora_jax import lora, model
from clip_lora_jax.errors import UserError
from clip_lora_jax.tokenizer import Tokenizer

TEXT_CHUNK = 256  # Prompts encoded at once inside the compiled text loop.
# CoOp's `ZeroshotCLIP2` ensemble: these seven templates plus the dataset's own (CoOp) template.
COOP_ENSEMBLE = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                 "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                 "a photo of the small {}.")
# config: the run's `config.template` (CLIP-LoRA's "a photo of a {}." for every dataset); coop:
# the dataset's hand-crafted template; coop_ensemble: the 7 + 1 above; clip_ensemble: the
# dataset's template ensemble (CLIP's 80 for ImageNet, else its CoOp template).
TEMPLATE_SETS = ("config", "coop", "coop_ensemble", "clip_ensemble")


def templates(spec: Any, choice: str, template: str) -> tuple[str, ...]:
  """The prompt templates of a `TEMPLATE_SETS` choice for dataset `spec` (a `data.DatasetSpec`);
  `template` is the config's."""
  sets = {"config": (template,), "coop": (spec.coop_template,),
          "coop_ensemble": (*COOP_ENSEMBLE, spec.coop_template),
          "clip_ensemble": tuple(spec.ensemble_templates)}
  if choice not in sets:
    raise UserError(f"templates={choice!r}: use one of {', '.join(TEMPLATE_SETS)}")
  return sets[choice]


def prompt_ids(tokenizer: Tokenizer, class_names: Sequence[str],
               templates: Sequence[str]) -> np.ndarray:
  """(C, K, T) token ids of every template filled with every class name, trimmed exactly."""
  prompts = [t.format(name) for name in class_names for t in templates]
  ids = model.trim_token_ids(tokenizer(prompts))
  return ids.reshape(len(class_names), len(templates), ids.shape[-1])


@functools.partial(jax.jit, static_argnums=(1,))
def text_classifier(params: model.Params, config: model.CLIPConfig,
                    ids: jax.Array) -> jax.Array:
  """(C, K, T) prompt ids -> (C, E) unit class embeddings: the mean of the K normalised prompt
  embeddings of each class, renormalised (CLIP's template ensemble; K = 1 is one template)."""
  classes, templates, length = ids.shape
  emb = model.encode_texts(params, ids.reshape(-1, length), config, chunk_size=TEXT_CHUNK)
  emb = model.normalize(emb).reshape(classes, templates, -1).mean(axis=1)
  return model.normalize(emb)


@functools.partial(jax.jit, static_argnums=(1,))
def text_embedding_means(params: model.Params, config: model.CLIPConfig,
                         ids: jax.Array) -> jax.Array:
  """(C, K, T) prompt ids -> (C, E) the mean of the K unnormalised prompt embeddings of each
  class (TaskRes's base classifier: its norm sets the scale of the residual added to it)."""
  classes, templates, length = ids.shape
  emb = model.encode_texts(params, ids.reshape(-1, length), config, chunk_size=TEXT_CHUNK)
  return emb.reshape(classes, templates, -1).mean(axis=1)


def zero_shot_classifier(params: model.Params, config: model.CLIPConfig, tokenizer: Tokenizer,
                         class_names: Sequence[str], templates: Sequence[str],
                         unit: bool = True) -> jax.Array:
  """Class embeddings of `class_names` under `templates` (e.g. ("a photo of a {}.",)): unit
  (`text_classifier`), or with `unit=False` the unnormalised means (`text_embedding_means`)."""
  ids = jnp.asarray(prompt_ids(tokenizer, class_names, templates))
  return text_classifier(params, config, ids) if unit else text_embedding_means(params, config, ids)


@functools.partial(jax.jit, static_argnums=(1,))
def _clip_logits(params: model.Params, config: model.CLIPConfig, classifier: jax.Array,
                 images: jax.Array) -> jax.Array:
  return model.normalize(model.encode_images(params, images, config)) @ classifier.T


def clip_logits_fn(params: model.Params, config: model.CLIPConfig,
                   classifier: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """images -> cos(image, class) logits of CLIP with (C, E) unit class embeddings `classifier`
  (one compiled program; the weights are arguments, not constants baked into it)."""
  return functools.partial(_clip_logits, params, config, classifier)


@jax.jit
def _counts(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = (top5[:, 0] == labels) * mask
  hit5 = jnp.any(top5 == labels[:, None], axis=-1) * mask
  return hit1.sum(), hit5.sum(), mask.sum()


def evaluate(logits_fn: Callable[[jax.Array], jax.Array],
             batches: Iterable[Mapping[str, np.ndarray]], total: int | None = None,
             progress: bool = True, place: Callable[[dict], dict] = dict) -> dict[str, float]:
  """Top-1 / top-5 accuracy (in %) of the class scores `logits_fn(images)` (e.g.
  `clip_logits_fn`, or an adapter's such as `methods.logits_fn`).

  `batches` yield {"image", "label", "mask"}; examples with mask 0 (padding of the last batch)
  are not counted. `place` puts a host batch on devices (e.g. `sharding.global_batch`, where
  each process yields its own rows). `total` (examples) only sizes the progress bar.
  """
  hits1 = hits5 = count = 0
  with tqdm.tqdm(total=total, desc="eval", unit="img", disable=not progress,
                 dynamic_ncols=True) as bar:
    for host_batch in batches:
      batch = place({"mask": np.ones(len(host_batch["label"]), np.float32), **host_batch})
      h1, h5, n = _counts(logits_fn(batch["image"]), batch["label"],
                          batch["mask"].astype(jnp.float32))
      hits1, hits5, count = hits1 + float(h1), hits5 + float(h5), count + int(n)
      bar.update(int(n))
  if count == 0:
    raise ValueError("evaluation got no examples")
  return {"top1": 100.0 * hits1 / count, "top5": 100.0 * hits5 / count, "count": count}


def adapter_logits_fn(config: model.CLIPConfig, params: model.Params, lora_params: model.Params,
                      lora_config: lora.LoRAConfig,
                      class_prompt_ids: np.ndarray) -> Callable[[jax.Array], jax.Array]:
  """`clip_logits_fn` of base `params` with a weight-space adapter merged in, the classes given
  by (C, T) prompt ids."""
  merged = lora.merge(params, lora_params, lora_config)
  classifier = text_classifier(merged, config, jnp.asarray(class_prompt_ids)[:, None, :])
  return clip_logits_fn(merged, config, classifier)
