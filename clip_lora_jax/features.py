"""Frozen CLIP image features of few-shot sets, for the methods that train on features (LLU, the
feature-cache baselines of `methods.feature_cache`).

The pooled features (before the visual projection) of `views` augmented views of every training
shot, of the clean (test-preprocessed) training shots and of the validation shots are computed
once with the frozen base and cached as one .npz keyed by the base weights and the exact images,
so a second run (another method, other hyper-parameters, a resumed run) starts training within
seconds. Methods get the projected embeddings, or the features themselves (those that train the
projection).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Mapping

import jax
import numpy as np

from clip_lora_jax import data, model, sharding
from clip_lora_jax.errors import UserError

_VERSION = 3  # Bump when what is cached changes.
KINDS = ("views", "shots", "val")  # Each with its labels, `<kind>_labels`.


def encode(params: model.Params, config: model.CLIPConfig, images: jax.Array) -> jax.Array:
  """Pooled features of the frozen image tower (compiled once per shape)."""
  return model.encode_image_features(params, images, config)


def embed_batches(params: model.Params, config: model.CLIPConfig,
                  batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh,
                  limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(N, W) float32 pooled image features and (N,) labels of every unmasked row of
  `batches` (each process's rows of global batches), in order; stops after `limit` rows."""
  place = lambda batch: sharding.global_batch(mesh, batch)
  gather = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))
  embeddings, labels = [], []
  count = 0
  for host_batch in batches:
    batch = place({"mask": np.ones(len(host_batch["label"]), np.int32), **host_batch})
    emb, label, mask = (np.asarray(gather(x).addressable_data(0)) for x in
                        (encode(params, config, batch["image"]), batch["label"], batch["mask"]))
    keep = mask.astype(bool)
    embeddings.append(emb[keep])
    labels.append(label[keep])
    count += int(keep.sum())
    if limit is not None and count >= limit:
      break
  return (np.concatenate(embeddings)[:limit].astype(np.float32),
          np.concatenate(labels)[:limit].astype(np.int32))


def few_shot_features(params: model.Params, config: model.CLIPConfig, fingerprint: str,
                      few: data.FewShotSet, views: int, seed: int, batch_size: int,
                      mesh: jax.sharding.Mesh, cache_dir: str | None = None,
                      projected: bool = True) -> dict[str, np.ndarray]:
  """Unnormalised image embeddings (`projected`; else the pooled features before the visual
  projection) of a few-shot set, from the cache when present:

  views, view_labels: `views` augmented views of every training shot, (views x N, E): the first
    `views` epochs of `data.train_batches(few, seed=seed)`, i.e. the very images a LoRA run
    of that seed trains on first;
  shots, shot_labels: the training shots test-preprocessed (decode, resize, centre crop);
  val, val_labels: the validation shots, test-preprocessed (absent when there are none).
  """
  out = _pooled_features(params, config, fingerprint, few, views, seed, batch_size, mesh,
                         cache_dir)
  if projected:
    project = jax.jit(model.project_images)
    out.update({kind: np.asarray(project(params, out[kind])) for kind in KINDS if kind in out})
  return out


def _pooled_features(params: model.Params, config: model.CLIPConfig, fingerprint: str,
                     few: data.FewShotSet, views: int, seed: int, batch_size: int,
                     mesh: jax.sharding.Mesh, cache_dir: str | None) -> dict[str, np.ndarray]:
  """`few_shot_features` before the projection: computed once, then read from the cache."""
  # Imported here: `source` brings TensorFlow, which the methods' train steps do not need.
  from clip_lora_jax.data import source  # pylint: disable=import-outside-toplevel
  key = _cache_key(fingerprint, config, few, views, seed)
  path = os.path.join(cache_dir or source.default_cache_dir(), "features", f"{key[:24]}.npz")
  if os.path.exists(path):
    with np.load(path) as cached:
      out = dict(cached)
    if str(out.pop("key", "")) != key:
      raise UserError(f"the feature cache {path!r} holds the features of another base model or "
                      "task (its key differs): delete that file, or pass another "
                      "--config.cache_dir")
    return out
  hosts = sharding.process_rows()
  size = config.vision.image_size
  embed = functools.partial(embed_batches, params, config, mesh=mesh)
  out = {}
  out["views"], out["view_labels"] = embed(
      data.train_batches(few, batch_size=batch_size, image_size=size, seed=seed, **hosts),
      limit=views * len(few.images))
  out["shots"], out["shot_labels"] = embed(
      data.few_shot_eval_batches(few, "train", batch_size, size, **hosts))
  if len(few.val_images):
    out["val"], out["val_labels"] = embed(
        data.few_shot_eval_batches(few, "val", batch_size, size, **hosts))
  if jax.process_index() == 0:
    source.save_npz_atomic(path, key=np.asarray(key), **out)
  return out


def _cache_key(fingerprint: str, config: model.CLIPConfig, few: data.FewShotSet, views: int,
               seed: int) -> str:
  """The base weights and architecture, the exact images and labels, views and seed, hashed;
  the cache file is named by its start and holds it whole, checked on reading."""
  digest = hashlib.sha256(repr((_VERSION, fingerprint, config, views, seed)).encode())
  for part in (*few.images, few.labels.tobytes(), *few.val_images, few.val_labels.tobytes()):
    digest.update(hashlib.sha256(part).digest())
  return digest.hexdigest()
