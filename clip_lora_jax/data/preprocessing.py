"""Test-time image preprocessing of CLIP-LoRA, as TensorFlow ops usable inside tf.data pipelines.

Bicubic resize of the shortest side to `size` then a central `size` x `size` crop (torchvision's
`Resize(size)` + `CenterCrop(size)`), then CLIP's normalisation. Resizing is antialiased bicubic,
as PIL's (on which the reference works). Training augmentation: `train_input`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from clip_lora_jax.model import CLIP_MEAN, CLIP_STD


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
