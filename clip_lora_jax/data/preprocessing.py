"""Image preprocessing of CLIP-LoRA, as TensorFlow ops usable inside tf.data pipelines.

Train: torchvision's `RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic)` then a
horizontal flip with probability 1/2. Test: bicubic resize of the shortest side to `size` then
a central `size` x `size` crop (torchvision's `Resize(size)` + `CenterCrop(size)`). Both end with
CLIP's normalisation. Resizing is antialiased bicubic, as PIL's (on which the reference works).

Randomness is stateless: an image's augmentation is a pure function of its seed, so a batch can be
recomputed anywhere (another host, a resumed run) from its seeds alone.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# torchvision's RandomResizedCrop tries this many random boxes before its central fallback.
CROP_ATTEMPTS = 10


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG / PNG / GIF / BMP bytes -> uint8 (H, W, 3); JPEG with libjpeg's accurate DCT."""
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


def normalize(image: tf.Tensor) -> tf.Tensor:
  """Pixel values in [0, 255] -> CLIP-normalised float32 (values are clipped to [0, 255] first,
  as an 8-bit resized image would be)."""
  image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0) / 255.0
  return (image - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


def _resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  return tf.image.resize(image, tf.stack([height, width]), method="bicubic", antialias=True)


def eval_preprocess(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 (H, W, 3) -> float32 (size, size, 3): shortest side resized to `size`, central crop."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  # torchvision: the long side becomes int(size * long / short).
  new_long = tf.cast(tf.cast(size * long, tf.float64) / tf.cast(short, tf.float64), tf.int32)
  new_height, new_width = tf.cond(height <= width, lambda: (size, new_long),
                                  lambda: (new_long, size))
  resized = _resize(image, new_height, new_width)
  # torchvision: int(round((dimension - size) / 2)).
  top = tf.cast(tf.round((new_height - size) / 2), tf.int32)
  left = tf.cast(tf.round((new_width - size) / 2), tf.int32)
  return normalize(resized[top:top + size, left:left + size])


def preprocess_for_eval(image: np.ndarray, image_size: int) -> np.ndarray:
  """The test preprocessing of one uint8 (H, W, 3) image -> float32 (image_size, image_size, 3)."""
  return eval_preprocess(tf.convert_to_tensor(image, tf.uint8), image_size).numpy()


def random_resized_crop_box(height: tf.Tensor, width: tf.Tensor,
                            seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """(top, left, box height, box width) of torchvision's RandomResizedCrop, for a [2] seed.

  Up to `CROP_ATTEMPTS` boxes of area fraction U(CROP_SCALE) and aspect ratio (width / height)
  log-uniform in CROP_RATIO are drawn; the first that fits is placed uniformly at random. If none
  fits, the largest central box with the ratio clamped into CROP_RATIO is taken.
  """
  scale_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = height_f * width_f * tf.random.stateless_uniform(
      [CROP_ATTEMPTS], scale_seed, CROP_SCALE[0], CROP_SCALE[1])
  ratio = tf.exp(tf.random.stateless_uniform(
      [CROP_ATTEMPTS], ratio_seed, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
  box_w = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  box_h = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fits = (box_w > 0) & (box_h > 0) & (box_w <= width) & (box_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))

  def random_box():
    h, w = box_h[first], box_w[first]
    top = tf.random.stateless_uniform([], top_seed, 0, height - h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, width - w + 1, dtype=tf.int32)
    return top, left, h, w

  def central_box():
    in_ratio = width_f / height_f
    w = tf.where(in_ratio > CROP_RATIO[1],
                 tf.cast(tf.round(height_f * CROP_RATIO[1]), tf.int32), width)
    h = tf.where(in_ratio < CROP_RATIO[0],
                 tf.cast(tf.round(width_f / CROP_RATIO[0]), tf.int32), height)
    return (height - h) // 2, (width - w) // 2, h, w

  return tf.cond(tf.reduce_any(fits), random_box, central_box)


def train_preprocess(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3) -> augmented float32 (size, size, 3), a pure function of the [2] `seed`."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_box(shape[0], shape[1], crop_seed)
  resized = _resize(image[top:top + h, left:left + w], size, size)
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  resized = tf.cond(flip, lambda: tf.image.flip_left_right(resized), lambda: resized)
  return normalize(resized)
