"""The training input of a few-shot run: the chosen shots and their augmented batches.

Augmentation is the reference's, on the host with PIL (which the reference's torchvision
transforms run on): torchvision's `RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3),
bicubic)` (up to ten random boxes, then a central fallback), PIL's crop and bicubic resize, a
horizontal flip with probability 1/2. Batches hold uint8 pixels: CLIP's normalisation runs on the
device (`model.normalize_pixels`), so the host sends a quarter of the bytes and does no float
work. Images are decoded once, on first use, and kept; a pool of threads (PIL releases the GIL
while it decodes and resamples) prepares the next batches while the accelerator trains.

Batches are a pure function of (seed, step): sample position p = step * batch_size + row belongs
to epoch p // n, whose order is a permutation seeded by (seed, epoch), and its augmentation is
seeded by (seed, p). Resuming at a step, or computing only some rows of a batch on another host,
gives exactly the batches of one uninterrupted single-host run.

Nothing here needs TensorFlow: a train step can be fed where only JAX is installed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import math
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from clip_lora_jax.errors import UserError

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# torchvision's RandomResizedCrop tries this many random boxes before its central fallback.
CROP_ATTEMPTS = 10
PREFETCH_BATCHES = 2  # Batches prepared ahead of the one being consumed.

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class FewShotSet:
  """A K-shot training set and its validation shots.

  Attributes:
    images: encoded images (JPEG / PNG bytes as TFDS stores them), decoded by the pipelines.
    labels: int32 benchmark labels of `images`.
    val_images, val_labels: the validation shots, disjoint from the training ones.
    num_classes: number of benchmark classes.
  """
  images: list[bytes]
  labels: np.ndarray
  val_images: list[bytes]
  val_labels: np.ndarray
  num_classes: int


def decode(encoded: bytes) -> np.ndarray:
  """Encoded JPEG / PNG / GIF / BMP bytes -> uint8 (H, W, 3) RGB (libjpeg's accurate DCT)."""
  with Image.open(io.BytesIO(encoded)) as image:
    return np.asarray(image.convert("RGB"))


def random_resized_crop_box(height: int, width: int,
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, box height, box width) as torchvision's `RandomResizedCrop.get_params` draws it.

  Up to CROP_ATTEMPTS boxes of area fraction U(CROP_SCALE) and aspect ratio (width / height)
  log-uniform in CROP_RATIO; the first that fits is placed uniformly at random. If none fits,
  the largest central box with the ratio clamped into CROP_RATIO.
  """
  area = height * width
  log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
  for _ in range(CROP_ATTEMPTS):
    target_area = area * rng.uniform(*CROP_SCALE)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * ratio)))
    h = int(round(math.sqrt(target_area / ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < CROP_RATIO[0]:
    w, h = width, int(round(width / CROP_RATIO[0]))
  elif in_ratio > CROP_RATIO[1]:
    w, h = int(round(height * CROP_RATIO[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def augment(pixels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 (H, W, 3) -> augmented uint8 (size, size, 3): random resized crop (PIL bicubic), then
  a horizontal flip with probability 1/2."""
  top, left, h, w = random_resized_crop_box(pixels.shape[0], pixels.shape[1], rng)
  crop = Image.fromarray(pixels[top:top + h, left:left + w])
  resized = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
  return resized[:, ::-1] if rng.random() < 0.5 else resized


def local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """This process's rows [start, end) of every global batch."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is not in [0, process_count = {process_count})")
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch size {batch_size} must be positive and divisible by the process "
                    f"count {process_count}")
  local = batch_size // process_count
  return process_index * local, (process_index + 1) * local


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(few: FewShotSet, batch_size: int = 32, image_size: int = 224, seed: int = 1,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  workers: int | None = None) -> Iterator[Batch]:
  """Endless augmented training batches {"image": uint8 (B/P, S, S, 3), "label": int32 (B/P,)}.

  Batch k (counting from 0) is the same whatever `start_step` the iterator started from, and
  process i of P gets its rows [i * B / P, (i + 1) * B / P). `workers` threads (default: one
  per CPU) decode and augment ahead of the consumer.
  """
  if not few.images:
    raise UserError("the few-shot set is empty: no class has training examples")
  if seed < 0 or start_step < 0:
    raise UserError(f"seed and start_step must be >= 0, got {seed} and {start_step}")
  rows = local_rows(batch_size, process_index, process_count)
  return _batches(few, batch_size, image_size, seed, start_step, rows,
                  workers or os.cpu_count() or 1)


def _batches(few: FewShotSet, batch_size: int, image_size: int, seed: int, start_step: int,
             rows: tuple[int, int], workers: int) -> Iterator[Batch]:
  count = len(few.images)
  decoded: list[np.ndarray | None] = [None] * count
  order = functools.lru_cache(maxsize=4)(lambda epoch: epoch_order(count, seed, epoch))

  def example(position: int) -> tuple[int, np.ndarray]:
    epoch, offset = divmod(position, count)
    index = int(order(epoch)[offset])
    if decoded[index] is None:  # Two threads may both decode an image: same result.
      decoded[index] = decode(few.images[index])
    return index, augment(decoded[index], image_size, np.random.default_rng([seed, position]))

  def submit(step: int) -> list[concurrent.futures.Future]:
    first = step * batch_size
    return [pool.submit(example, first + row) for row in range(*rows)]

  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="augment") as pool:
    pending = collections.deque(submit(start_step + k) for k in range(PREFETCH_BATCHES + 1))
    step = start_step + PREFETCH_BATCHES + 1
    try:
      while True:
        results = [future.result() for future in pending.popleft()]
        pending.append(submit(step))
        step += 1
        yield {"image": np.stack([image for _, image in results]),
               "label": few.labels[[index for index, _ in results]].astype(np.int32)}
    finally:
      for futures in pending:
        for future in futures:
          future.cancel()
