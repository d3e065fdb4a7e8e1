"""Many LoRA adapters of one base in one batch: each example through its own task's low-rank
branch, nothing merged into the image tower.

A batch whose examples belong to different tasks (task t: an adapter and its classes) runs the
vision tower once. Every adapted projection computes, for an example of task t,

    y = x W + (x a[t]) (s_t b[t])

with the N adapters' pairs stacked along a leading task axis (`stack_adapters`) and gathered
per example (`model.Dense` reads per-example (B, in, r) / (B, r, out) pairs). Each task's class
embeddings are computed once, by its merged text tower (as `methods.lora.logits_fn` does), and
padded to a common class count; the logits of an example beyond its task's classes are -inf.
Per example, the logits (cosines, as `methods.logits_fn` gives for the LoRA family) equal those
of the task's merged single-task model up to float rounding: tests/test_multi_adapter.py checks
them within 1e-5 of the largest logit in float32 (they differ by about 1e-7).

  adapters = [lora.load_adapter(p) for p in paths]
  serve = multi_adapter.MultiAdapterClassifier.build(base, adapters, class_names, templates)
  logits = serve(images, task_ids)             # (B, max classes), -inf padded

Adapters differing in rank, layers or matrices are served together: pairs are zero-padded to the
largest rank, and a projection one adapter leaves alone gets a zero pair for it (exact: zero
columns add exactly zero). Scales are folded into b and `LoRAConfig.pairs` gives the pairs (an
`a` shared by input chunks tiled to full rows, as `lora.merge` does), so CLIP-LoRA and Block-LoRA
adapters mix too. benchmarks/multi_adapter.py measures the throughput against merging per task.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clip_lora_jax import base as base_lib
from clip_lora_jax import evaluation, lora, model
from clip_lora_jax.errors import UserError


def _scaled_pairs(adapter: lora.Adapter) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
  """Path of each adapted projection -> (a (in, r), scale * b (r, out)) of `adapter`: the
  branch it adds there is x @ a @ (scale * b)."""
  flat = traverse_util.flatten_dict(adapter.config.pairs(adapter.lora))
  pairs = {}
  for path in dict.fromkeys(key[:-1] for key in flat):
    a, b = flat[(*path, "a")], flat[(*path, "b")]
    width = adapter.base_config.tower(path[0]).width
    pairs[path] = (jnp.tile(a.astype(jnp.float32), (width // a.shape[0], 1)),
                   b.astype(jnp.float32) * adapter.config.scale)
  return pairs


def stack_adapters(adapters: Sequence[lora.Adapter]) -> model.Params:
  """The (a, b) pairs of N weight-space adapters of one base, stacked along a leading task axis:
  {'vision': {'layers_3': {'attn': {'q': {'a': (N, in, r), 'b': (N, r, out)}}}}, ...} with each
  adapter's scale folded into its b (the model applies them with scale 1), every pair padded
  with zeros to the largest rank at its path, and zero pairs where an adapter adapts nothing."""
  if not adapters:
    raise UserError("no adapters to stack: give at least one")
  for i, adapter in enumerate(adapters):
    if not isinstance(adapter, lora.Adapter):
      raise UserError(f"adapter {i} is a {adapter.method!r} adapter: only weight-space adapters "
                      "(the LoRA family) run side by side in one batch")
    if (adapter.base_config, adapter.base_fingerprint) != (adapters[0].base_config,
                                                           adapters[0].base_fingerprint):
      raise UserError(f"adapter {i} was trained on base {adapter.base_name!r} (fingerprint "
                      f"{adapter.base_fingerprint}), adapter 0 on {adapters[0].base_name!r} "
                      f"({adapters[0].base_fingerprint}): adapters served together share a base")
  pairs = [_scaled_pairs(adapter) for adapter in adapters]
  stacked = {}
  for path in sorted({p for task in pairs for p in task}):
    present = [task[path] for task in pairs if path in task]
    rank = max(a.shape[1] for a, _ in present)
    (width_in, _), (_, width_out) = present[0][0].shape, present[0][1].shape
    a_all = np.zeros((len(adapters), width_in, rank), np.float32)
    b_all = np.zeros((len(adapters), rank, width_out), np.float32)
    for t, task in enumerate(pairs):
      if path in task:
        a, b = task[path]
        a_all[t, :, :a.shape[1]], b_all[t, :b.shape[0]] = a, b
    stacked[(*path, "a")], stacked[(*path, "b")] = jnp.asarray(a_all), jnp.asarray(b_all)
  return traverse_util.unflatten_dict(stacked)


@functools.partial(jax.jit, static_argnames=("config",))
def encode_images_multi(params: model.Params, stacked: model.Params, task_ids: jax.Array,
                        images: jax.Array, config: model.CLIPConfig) -> jax.Array:
  """(B, E) unnormalised image embeddings, image i through the vision tower with the low-rank
  branches of task `task_ids[i]` of `stacked` (`stack_adapters`), nothing merged."""
  per_example = jax.tree.map(lambda s: s[task_ids], stacked.get("vision", {}))
  return model.encode_images(params, images, config,
                             lora={"vision": per_example} if per_example else None)


@functools.partial(jax.jit, static_argnames=("config",))
def _multi_logits(params: model.Params, stacked: model.Params, classifiers: jax.Array,
                  counts: jax.Array, task_ids: jax.Array, images: jax.Array,
                  config: model.CLIPConfig) -> jax.Array:
  emb = model.normalize(encode_images_multi(params, stacked, task_ids, images, config))
  tasks, classes, _ = classifiers.shape
  # Every task's classes in one product ((B, N * C): small beside the tower), then each
  # example's own task's block: no (B, C, E) gather of class embeddings.
  every = (emb @ classifiers.reshape(tasks * classes, -1).T).reshape(-1, tasks, classes)
  logits = jnp.take_along_axis(every, task_ids[:, None, None], axis=1)[:, 0]
  return jnp.where(jnp.arange(classes)[None] < counts[task_ids][:, None], logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class MultiAdapterClassifier:
  """N tasks of one base, each an adapter and its classes, served in mixed batches.

  params: the base weights; stacked: `stack_adapters` of the adapters; classifiers: (N, C, E)
  unit class embeddings of each task (its merged text tower), zero rows beyond its classes;
  class_names: each task's, C the largest count.
  """
  params: model.Params
  config: model.CLIPConfig
  stacked: model.Params
  classifiers: jax.Array
  class_names: tuple[tuple[str, ...], ...]

  @classmethod
  def build(cls, base: base_lib.BaseModel, adapters: Sequence[lora.Adapter],
            class_names: Sequence[Sequence[str]],
            templates: Sequence[Sequence[str]]) -> "MultiAdapterClassifier":
    """Loads N adapters of `base` once: their stacked pairs, and each task's class
    embeddings of `class_names[t]` under `templates[t]` by its merged text tower."""
    if not len(adapters) == len(class_names) == len(templates):
      raise UserError(f"{len(adapters)} adapters, {len(class_names)} class lists and "
                      f"{len(templates)} template lists: give one of each per task")
    stacked = stack_adapters(adapters)
    tasks = []
    for adapter, names, prompts in zip(adapters, class_names, templates):
      lora.check_compatible(adapter, base.name, base.config, base.fingerprint)
      merged = lora.merge(base.params, adapter.lora, adapter.config)
      tasks.append(evaluation.zero_shot_classifier(merged, base.config, base.tokenizer,
                                                   names, prompts))
    width = max(len(names) for names in class_names)
    classifiers = jnp.stack([jnp.pad(c, ((0, width - len(c)), (0, 0))) for c in tasks])
    return cls(base.params, base.config, stacked, classifiers,
               tuple(tuple(names) for names in class_names))

  def __call__(self, images: jax.Array, task_ids: jax.Array) -> jax.Array:
    """(B, C) cosine logits of image i over the classes of task `task_ids[i]`; -inf beyond its
    task's class count."""
    counts = jnp.asarray([len(names) for names in self.class_names], jnp.int32)
    task_ids = jnp.asarray(task_ids, jnp.int32)
    return _multi_logits(self.params, self.stacked, self.classifiers, counts, task_ids, images,
                         self.config)
