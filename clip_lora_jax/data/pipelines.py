"""Eval batches as numpy dicts, from tf.data pipelines (training batches: `train_input`).

Eval batches visit every example of a benchmark split once. With P processes each takes a
contiguous 1/P of the examples and yields batch_size / P rows per batch; every process yields
the same number of batches, the last ones padded with `mask` = 0 rows (label 0, zero image), so
shapes stay static under jit and padding is never counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from clip_lora_jax.data import preprocessing, source, splits
from clip_lora_jax.data.train_input import FewShotSet, local_rows
from clip_lora_jax.data.registry import DatasetSpec
from clip_lora_jax.errors import UserError

Batch = dict[str, np.ndarray]


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _padded_batches(images_and_labels: tf.data.Dataset, count: int, local_batch: int,
                    num_batches: int, image_size: int) -> tf.data.Dataset:
  """`count` (image, label) pairs, padded with masked rows up to `num_batches` full batches."""
  def real(image, label):
    return {"image": image, "label": label, "mask": tf.constant(1, tf.int32)}
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros((image_size, image_size, 3), tf.float32),
      "label": tf.constant(0, tf.int32), "mask": tf.constant(0, tf.int32),
  }).repeat(num_batches * local_batch - count)
  ds = images_and_labels.map(real).concatenate(padding)
  return ds.batch(local_batch, drop_remainder=True).prefetch(2)


def _eval_images(encoded: tf.data.Dataset, image_size: int) -> tf.data.Dataset:
  return encoded.map(lambda image, label: (
      preprocessing.eval_preprocess(preprocessing.decode_image(image), image_size), label),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _reraise_corrupt(batches: Iterator[Batch], where: str) -> Iterator[Batch]:
  """Turns TensorFlow's decoding failure of a damaged image into a `UserError`."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as e:
    raise UserError(f"an image of {where} does not decode ({e.message}): the prepared TFDS data "
                    "is damaged; delete it and prepare the dataset again") from e


def _process_eval_batches(count: int, encoded_part: Callable[[int, int], tf.data.Dataset],
                          batch_size: int, image_size: int, process_index: int,
                          process_count: int) -> tf.data.Dataset:
  """Eval batches of `count` examples spread over processes: process i reads its contiguous
  part [start, end) through `encoded_part(start, end)` ((encoded image, label) pairs) and pads it
  with masked rows to the batch count that every process yields."""
  rows = local_rows(batch_size, process_index, process_count)
  local_batch = rows[1] - rows[0]
  start = process_index * count // process_count
  end = (process_index + 1) * count // process_count
  num_batches = _ceil_div(_ceil_div(count, process_count), local_batch)
  return _padded_batches(_eval_images(encoded_part(start, end), image_size), end - start,
                         local_batch, num_batches, image_size)


def eval_batches(spec: DatasetSpec, split: str = "test", batch_size: int = 256,
                 image_size: int = 224, data_dir: str | None = None,
                 split_file: str | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Every example of benchmark split `split` once: {"image", "label", "mask"} batches.

  `batch_size` is global; each process yields batch_size / process_count rows per batch (see
  the module docstring). A damaged image raises a `UserError`.
  """
  examples = splits.benchmark_split(spec, split, data_dir, split_file)
  tfds_builder = source.builder(spec, data_dir)

  def encoded_part(start: int, end: int) -> tf.data.Dataset:
    mine = examples.subset(np.arange(start, end))
    encoded = tf.data.Dataset.from_tensor_slices((np.zeros(0, bytes), np.zeros(0, np.int32)))
    for tfds_split in dict.fromkeys(mine.tfds_split):
      part = mine.subset(np.flatnonzero(mine.tfds_split == tfds_split))
      images = source.selected(spec, tfds_builder, tfds_split, part.index)
      labels = tf.data.Dataset.from_tensor_slices(part.label.astype(np.int32))
      encoded = encoded.concatenate(tf.data.Dataset.zip((images, labels)).map(
          lambda indexed, label: (indexed[1], label)))
    return encoded

  ds = _process_eval_batches(len(examples), encoded_part, batch_size, image_size, process_index,
                             process_count)
  return _reraise_corrupt(ds.as_numpy_iterator(), f"{spec.name} {split}")


def few_shot_eval_batches(few: FewShotSet, part: str = "val", batch_size: int = 256,
                          image_size: int = 224, process_index: int = 0,
                          process_count: int = 1) -> Iterator[Batch]:
  """The validation shots (`part="val"`) or the training shots (`part="train"`) of `few`,
  test-preprocessed, as eval batches ({"image", "label", "mask"}); as in `eval_batches`, each
  of P processes yields its contiguous 1/P, padded to the same count."""
  images, labels = {"val": (few.val_images, few.val_labels),
                    "train": (few.images, few.labels)}[part]

  def encoded_part(start: int, end: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        (tf.constant(images[start:end], tf.string), labels[start:end].astype(np.int32)))

  return _process_eval_batches(len(images), encoded_part, batch_size, image_size,
                               process_index, process_count).as_numpy_iterator()
