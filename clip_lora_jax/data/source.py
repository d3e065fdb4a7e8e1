"""Reading benchmark examples out of prepared TFDS datasets.

Examples are addressed by (TFDS split, index), the index counting examples in TFDS's canonical
order: the split's files are read one after the other (`interleave_cycle_length=1`, no file
shuffling), so the n-th example read is example n, for every number of shards.

Choosing examples needs only labels and file names: `catalog` reads those alone (images are
neither decoded nor kept) and caches them, so that even ImageNet's 1.28M training labels are read
once. `selected` then streams the encoded images of the chosen examples in one ordered pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from clip_lora_jax import files
from clip_lora_jax.files import default_cache_dir
from clip_lora_jax.data.builders import user_images
from clip_lora_jax.data.registry import DatasetSpec
from clip_lora_jax.errors import UserError


def builder(spec: DatasetSpec, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `spec` reading from `data_dir` (TFDS's default when None). A dataset of
  the user's own images is prepared here on first use (by default under the cache directory:
  `user_images.default_data_dir()`)."""
  if spec.builder_config is not None:
    return user_images.prepared_builder(spec.builder_config, data_dir)
  return tfds.builder(spec.tfds_name, data_dir=data_dir)


def prepare_command(spec: DatasetSpec, data_dir: str, manual_dir: str | None = None) -> str:
  command = f"python -m clip_lora_jax.data prepare {spec.name} --data_dir {data_dir}"
  return f"{command} --manual_dir {manual_dir}" if manual_dir else command


def default_manual_dir(data_dir: str) -> str:
  """TFDS's default manual directory for a data directory."""
  return os.path.join(data_dir, "downloads", "manual")


def not_prepared_error(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder) -> UserError:
  """What to run (and, for manual datasets, what to download where) to prepare `spec`."""
  root = os.fspath(tfds_builder.data_dir_root)
  where = f"{spec.name} is not prepared in {root} (no TFDS data for {spec.tfds_name})"
  if spec.manual_download is None:
    return UserError(f"{where}; prepare it with:\n  {prepare_command(spec, root)}")
  manual = default_manual_dir(root)
  return UserError(f"{where}. It needs a manual download: put {spec.manual_download} into a "
                   f"directory, e.g. {manual}, then run:\n  {prepare_command(spec, root, manual)}")


def as_dataset(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder, split: str,
               decoders: tfds.decode.PartialDecoding) -> tf.data.Dataset:
  """One TFDS split in canonical order; a `UserError` saying how to prepare it if it is not."""
  if tfds_builder.is_prepared() and split not in tfds_builder.info.splits:
    raise UserError(
        f"TFDS {spec.tfds_name} in {tfds_builder.data_dir_root} has no split {split!r} (it has "
        f"{', '.join(tfds_builder.info.splits)}), which {spec.name} needs; prepare it again "
        f"with every split:\n  {prepare_command(spec, os.fspath(tfds_builder.data_dir_root))}")
  try:
    return tfds_builder.as_dataset(
        split=split, shuffle_files=False, decoders=decoders,
        read_config=tfds.ReadConfig(interleave_cycle_length=1))
  except AssertionError as e:  # TFDS's "could not find data" for an unprepared dataset.
    raise not_prepared_error(spec, tfds_builder) from e


@dataclasses.dataclass(frozen=True)
class Catalog:
  """Labels and file names of every example of one TFDS split, by index.

  Attributes:
    labels: TFDS label ids, int64.
    file_names: the `file_key` feature as bytes (b"" when the dataset keeps no file names).
  """
  labels: np.ndarray
  file_names: np.ndarray


def cache_path(cache_dir: str, kind: str, tfds_builder: tfds.core.DatasetBuilder,
                *key: object) -> str:
  """A cache file for `kind` data of a prepared builder, keyed by its location, its split sizes
  (so that data prepared again differently is not mistaken for the cached one) and `key`."""
  sizes = sorted((name, split.num_examples, split.num_bytes)
                 for name, split in tfds_builder.info.splits.items())
  identity = repr((os.fspath(tfds_builder.data_dir), sizes, *key))
  digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
  name = tfds_builder.info.full_name.replace("/", "_")
  return os.path.join(cache_dir, kind, f"{name}_{digest}.npz")


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
  """Writes an .npz through a temporary file and a rename, so readers never see half a file."""
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def _read_catalog(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder,
                  split: str) -> Catalog:
  keys = [spec.label_key] + ([spec.file_key] if spec.file_key else [])
  ds = as_dataset(spec, tfds_builder, split, tfds.decode.PartialDecoding(dict.fromkeys(keys, True)))
  labels, file_names = [np.zeros(0, np.int64)], [np.zeros(0, "S1")]
  for batch in ds.batch(8192).prefetch(2).as_numpy_iterator():
    labels.append(batch[spec.label_key].astype(np.int64))
    file_names.append(np.asarray(batch[spec.file_key] if spec.file_key else
                                 [b""] * len(batch[spec.label_key]), dtype="S"))
  return Catalog(np.concatenate(labels), np.concatenate(file_names))


def catalog(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder, split: str,
            cache_dir: str | None) -> Catalog:
  """Labels and file names of TFDS split `split`, cached in `cache_dir` once read.

  Only data really prepared on disk is cached (not, say, `tfds.testing.mock_data`).
  """
  path = None
  if tfds_builder.is_prepared():
    path = cache_path(cache_dir or default_cache_dir(), "catalogs", tfds_builder, split,
                       spec.label_key, spec.file_key)
    if os.path.exists(path):
      with np.load(path) as cached:
        return Catalog(cached["labels"], cached["file_names"])
  result = _read_catalog(spec, tfds_builder, split)
  if path:
    save_npz_atomic(path, labels=result.labels, file_names=result.file_names)
  return result


def selected(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder, split: str,
             indices: np.ndarray) -> tf.data.Dataset:
  """(index, encoded image) of the examples at sorted, unique `indices` of `split`, in order.

  One pass over the split up to its last wanted example; the images are not decoded.
  """
  if len(indices) == 0:
    return tf.data.Dataset.from_tensor_slices((np.zeros(0, np.int64), np.zeros(0, bytes)))
  wanted = np.zeros(int(indices[-1]) + 1, bool)
  wanted[indices] = True
  wanted_t = tf.constant(wanted)
  decoders = tfds.decode.PartialDecoding({spec.image_key: True},
                                         decoders={spec.image_key: tfds.decode.SkipDecoding()})
  ds = as_dataset(spec, tfds_builder, split, decoders).take(len(wanted)).enumerate()
  ds = ds.filter(lambda i, example: tf.gather(wanted_t, i))
  return ds.map(lambda i, example: (i, example[spec.image_key]))
