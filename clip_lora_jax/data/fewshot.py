"""K-shot training sets with their validation shots: chosen, read and cached.

`sampling` chooses the examples from labels and file names alone (the reference code's choice by
default wherever it can be reproduced; see there); only the chosen images are then read, checked
and kept, encoded as TFDS stores them.

A corrupt chosen image is an error that names it (re-prepare the dataset), never skipped: a
skipped image would silently change K.

The result is cached in `cache_dir` as an .npz keyed by the prepared dataset, the benchmark
definition, the split file's and shot list's content, K, the seed and the sampler; it is written through a
temporary file and a rename, so concurrent runs never read half a file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from clip_lora_jax.data import preprocessing, registry, sampling, source, splits
from clip_lora_jax.data.registry import DatasetSpec
from clip_lora_jax.data.train_input import FewShotSet
from clip_lora_jax.errors import UserError

# Bump when the sampling changes, so that stale caches are not reused.
_SAMPLER_VERSION = 2


def _read_images(spec: DatasetSpec, data_dir: str | None,
                 chosen: splits.Examples) -> list[bytes]:
  """The encoded images of `chosen` (duplicates allowed), in order, one pass per TFDS split."""
  tfds_builder = source.builder(spec, data_dir)
  images: dict[tuple[str, int], bytes] = {}
  for split in np.unique(chosen.tfds_split):
    indices = np.unique(chosen.index[chosen.tfds_split == split])
    for index, image in source.selected(spec, tfds_builder, split, indices).as_numpy_iterator():
      images[split, int(index)] = image
  return [images[split, int(index)] for split, index in zip(chosen.tfds_split, chosen.index)]


def corrupt_images(images: Sequence[bytes]) -> list[int]:
  """Positions of the images that do not decode (decoded in parallel, errors skipped)."""
  def decoded_size(position, encoded):
    return position, tf.size(preprocessing.decode_image(encoded))
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(images), tf.string)).enumerate()
  ds = ds.map(decoded_size, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  decoded = {int(position) for position, _ in ds.as_numpy_iterator()}
  return [i for i in range(len(images)) if i not in decoded]


def _check_decodable(spec: DatasetSpec, chosen: splits.Examples, images: list[bytes]) -> None:
  corrupt = corrupt_images(images)
  if corrupt:
    raise UserError(
        f"{len(corrupt)} chosen {spec.name} images do not decode, e.g. "
        f"{chosen.describe(corrupt[0])}: the prepared TFDS data is damaged; delete it and "
        f"prepare {spec.name} again")


def _pack(images: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """Byte strings -> (concatenated uint8 buffer, offsets of length n + 1)."""
  offsets = np.cumsum([0, *map(len, images)], dtype=np.int64)
  return np.frombuffer(b"".join(images), np.uint8), offsets


def _unpack(buffer: np.ndarray, offsets: np.ndarray) -> list[bytes]:
  data = buffer.tobytes()
  return [data[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


def _save(path: str, few: FewShotSet) -> None:
  images, offsets = _pack(few.images)
  val_images, val_offsets = _pack(few.val_images)
  source.save_npz_atomic(path, images=images, offsets=offsets, labels=few.labels,
                         val_images=val_images, val_offsets=val_offsets,
                         val_labels=few.val_labels, num_classes=few.num_classes)


def _load(path: str) -> FewShotSet:
  with np.load(path) as f:
    return FewShotSet(_unpack(f["images"], f["offsets"]), f["labels"],
                      _unpack(f["val_images"], f["val_offsets"]), f["val_labels"],
                      int(f["num_classes"]))


def _sample(spec: DatasetSpec, shots: int, seed: int, data_dir: str | None,
            split_file: str | None, cache_dir: str | None, sampler: str,
            shot_lists: str | None) -> FewShotSet:
  choice = sampling.choose(spec, shots, seed, data_dir, split_file, cache_dir, sampler,
                           shot_lists)
  chosen = splits.Examples.concatenate([choice.train, choice.val])
  images = _read_images(spec, data_dir, chosen)
  _check_decodable(spec, chosen, images)
  labels = chosen.label.astype(np.int32)
  cut = len(choice.train)
  return FewShotSet(images[:cut], labels[:cut], images[cut:], labels[cut:], spec.num_classes)


def load_few_shot(spec: DatasetSpec, shots: int, seed: int, data_dir: str | None = None,
                  split_file: str | None = None, cache_dir: str | None = None,
                  sampler: str | None = None, shot_lists: str | None = None) -> FewShotSet:
  """The `shots`-shot training set of `spec` for `seed` (see the module docstring).

  Args:
    spec: the dataset.
    shots: K, training examples per class (>= 1).
    seed: sampling seed (>= 0); the same seed gives the same set.
    data_dir: TFDS data directory (TFDS's default when None).
    split_file: the protocol's `split_zhou_<Dataset>.json`, to sample from its exact splits.
    cache_dir: where to cache the set (`source.default_cache_dir()` when None).
    sampler: `sampling.REFERENCE`, `sampling.NUMPY` or `sampling.LISTS`; None for
      `sampling.resolve_sampler`'s default (the published lists when `shot_lists` is given, else
      the reference's choice wherever it can be reproduced).
    shot_lists: a directory of published lists of shots (`sampling.shot_list_file`).
  """
  subset = spec.subset_of
  if subset is not None and subset.same_examples:  # The dataset's draw, then its classes (CoCoOp).
    few = load_few_shot(registry.get_dataset(subset.dataset), shots, seed, data_dir, split_file,
                        cache_dir, sampler, shot_lists)
    labels, val_labels = subset.relabel(few.labels), subset.relabel(few.val_labels)
    return FewShotSet([image for image, label in zip(few.images, labels) if label >= 0],
                      labels[labels >= 0],
                      [image for image, label in zip(few.val_images, val_labels) if label >= 0],
                      val_labels[val_labels >= 0], spec.num_classes)
  sampler = sampling.resolve_sampler(spec, split_file, sampler, shot_lists)
  tfds_builder = source.builder(spec, data_dir)
  if not tfds_builder.is_prepared():  # e.g. tfds.testing.mock_data: nothing worth caching.
    return _sample(spec, shots, seed, data_dir, split_file, cache_dir, sampler, shot_lists)
  listed = (splits.split_file_digest(sampling.shot_list_file(shot_lists, shots, seed))
            if shot_lists is not None else "")
  cache = source.cache_path(
      cache_dir or source.default_cache_dir(), "fewshot", tfds_builder, spec.name, spec.splits,
      spec.label_map, splits.split_file_digest(split_file), shots, seed, sampler, listed,
      _SAMPLER_VERSION)
  if os.path.exists(cache):
    return _load(cache)
  few = _sample(spec, shots, seed, data_dir, split_file, cache_dir, sampler, shot_lists)
  _save(cache, few)
  return few
