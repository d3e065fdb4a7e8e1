"""Preprocessing and train / validation-shot batches, on in-memory images of known content."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from clip_lora_jax import data, model
from clip_lora_jax.data import preprocessing, train_input
from clip_lora_jax.errors import UserError

MEAN = np.asarray(data.CLIP_MEAN, np.float32)
STD = np.asarray(data.CLIP_STD, np.float32)


def png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def to_pixels(image: np.ndarray) -> np.ndarray:
  """CLIP-normalised float image -> pixel values in [0, 255]."""
  return (image * STD + MEAN) * 255.0


def solid(value: int, size: int = 12) -> np.ndarray:
  return np.full((size, size, 3), value, np.uint8)


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
  """Pixel value 4x in column x, every row and channel alike."""
  row = np.arange(width) * 4
  return np.broadcast_to(row[None, :, None], (height, width, 3)).astype(np.uint8)


def few_shot_set(num_images: int = 10) -> data.FewShotSet:
  """Image i is a solid image of value 20 * i with label i, so labels identify images."""
  images = [png(solid(20 * i)) for i in range(num_images)]
  return data.FewShotSet(images, np.arange(num_images, dtype=np.int32), images[:3],
                         np.arange(3, dtype=np.int32), num_images)


def test_normalisation_maps_clip_mean_to_zero_on_host_and_device_alike():
  mean_image = tf.constant(np.asarray(data.CLIP_MEAN) * 255.0 * np.ones((2, 2, 3)))
  np.testing.assert_allclose(preprocessing.normalize(mean_image), 0.0, atol=1e-6)
  pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
  np.testing.assert_allclose(model.normalize_pixels(pixels), preprocessing.normalize(pixels),
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(60, 100), (100, 60), (50, 50)])
def test_eval_preprocessing_matches_pil_resize_and_center_crop(shape):
  image = np.random.default_rng(0).integers(0, 256, (*shape, 3)).astype(np.uint8)
  size = 24
  out = data.preprocess_for_eval(image, size)
  assert out.shape == (size, size, 3) and out.dtype == np.float32

  height, width = shape  # torchvision: Resize(size) then CenterCrop(size), PIL bicubic.
  new_h, new_w = ((size, int(size * width / height)) if height <= width
                  else (int(size * height / width), size))
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC), np.float32)
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  expected = resized[top:top + size, left:left + size]
  assert np.abs(to_pixels(out) - expected).mean() < 1.0


def test_random_resized_crop_boxes_respect_scale_ratio_and_bounds():
  height, width = 100, 200
  for i in range(200):
    top, left, h, w = train_input.random_resized_crop_box(height, width,
                                                          np.random.default_rng([7, i]))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    scale, ratio = h * w / (height * width), w / h
    assert 0.08 * 0.9 <= scale <= 1.0
    assert 0.75 * 0.9 <= ratio <= 4 / 3 * 1.1


def test_random_resized_crop_falls_back_to_central_crop_with_clamped_ratio():
  # No box of at least 8% of a 10 x 1000 image with ratio in [3/4, 4/3] fits in 10 rows.
  box = train_input.random_resized_crop_box(10, 1000, np.random.default_rng(0))
  assert box == (0, (1000 - 13) // 2, 10, 13)


def test_augmentation_is_pil_crop_then_bicubic_resize_then_flip():
  """torchvision's order on PIL images: box, crop, bicubic resize, then the flip draw."""
  image = np.random.default_rng(0).integers(0, 256, (60, 90, 3)).astype(np.uint8)
  flips = 0
  for i in range(12):
    out = train_input.augment(image, 24, np.random.default_rng([1, i]))
    rng = np.random.default_rng([1, i])
    top, left, h, w = train_input.random_resized_crop_box(60, 90, rng)
    expected = np.asarray(Image.fromarray(image[top:top + h, left:left + w]).resize(
        (24, 24), Image.BICUBIC))
    if rng.random() < 0.5:
      expected, flips = expected[:, ::-1], flips + 1
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
  assert 0 < flips < 12


def test_train_augmentation_flips_half_of_the_gradients_and_keeps_them_monotonic():
  image = gradient()
  flipped = 0
  for i in range(40):
    out = train_input.augment(image, 32, np.random.default_rng([3, i])).astype(np.float32)
    assert out.shape == (32, 32, 3)
    steps = np.diff(out[16, :, 0])
    assert np.all(steps > -1.0) or np.all(steps < 1.0)  # monotonic up to resampling ripple
    flipped += bool(out[16, 0, 0] > out[16, -1, 0])
    # Rows are identical: the crop only cuts and rescales the gradient.
    np.testing.assert_allclose(out[0], out[-1], atol=1e-3)
  assert 10 <= flipped <= 30


def test_train_augmentation_crops_a_subrange_of_the_gradient():
  # A crop of scale >= 0.08 at ratio <= 4/3 spans at least sqrt(0.08 * 3/4) of the width.
  image = gradient(64, 64)
  for i in range(20):
    out = train_input.augment(image, 32, np.random.default_rng([5, i])).astype(np.float32)
    span = abs(out[16, -1, 0] - out[16, 0, 0])
    assert 0.2 * 63 * 4 <= span + 8 and span <= 63 * 4 + 8


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_train_batches_shapes_and_epochs_cover_every_image_once():
  few = few_shot_set(10)
  batches = take(data.train_batches(few, batch_size=5, image_size=16, seed=1), 4)
  for batch in batches:
    assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
  first_epoch = np.concatenate([b["label"] for b in batches[:2]])
  second_epoch = np.concatenate([b["label"] for b in batches[2:]])
  assert sorted(first_epoch) == list(range(10)) == sorted(second_epoch)
  assert list(first_epoch) != list(second_epoch)  # reshuffled each epoch
  # The image is the labelled one: solid value 20 * label survives any crop and flip.
  for batch in batches:
    np.testing.assert_allclose(batch["image"].mean(axis=(1, 2, 3)),
                               20.0 * batch["label"], atol=0.5)


def test_batches_span_epoch_boundaries_without_partial_batches():
  few = few_shot_set(3)
  labels = np.concatenate([b["label"] for b in take(
      data.train_batches(few, batch_size=2, image_size=8, seed=0), 3)])
  assert sorted(labels[:3]) == [0, 1, 2] and sorted(labels[3:]) == [0, 1, 2]


def test_train_batches_are_deterministic_in_the_seed():
  few = few_shot_set(6)
  first = take(data.train_batches(few, batch_size=4, image_size=16, seed=1), 3)
  again = take(data.train_batches(few, batch_size=4, image_size=16, seed=1), 3)
  other = take(data.train_batches(few, batch_size=4, image_size=16, seed=2), 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert any(not np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_resuming_at_a_step_yields_the_uninterrupted_batches():
  few = few_shot_set(7)
  uninterrupted = take(data.train_batches(few, batch_size=4, image_size=16, seed=3), 6)
  resumed = take(data.train_batches(few, batch_size=4, image_size=16, seed=3, start_step=4), 2)
  for a, b in zip(uninterrupted[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_batches_do_not_depend_on_the_worker_threads():
  few = few_shot_set(5)
  one = take(data.train_batches(few, batch_size=4, image_size=16, seed=2, workers=1), 3)
  many = take(data.train_batches(few, batch_size=4, image_size=16, seed=2, workers=3), 3)
  for a, b in zip(one, many):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_the_train_step_and_its_input_import_without_tensorflow():
  """The GPU machines of some clusters have JAX but no TensorFlow: only reading datasets needs it."""
  code = ("import sys; import clip_lora_jax.training, clip_lora_jax.data; "
          "clip_lora_jax.data.train_batches; "
          "assert not {'tensorflow', 'tensorflow_datasets'} & set(sys.modules), 'imported'")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_process_slices_concatenate_to_the_global_batch():
  few = few_shot_set(9)
  global_batches = take(data.train_batches(few, batch_size=6, image_size=16, seed=4), 3)
  slices = [take(data.train_batches(few, batch_size=6, image_size=16, seed=4, process_index=i,
                                    process_count=3), 3) for i in range(3)]
  for step, batch in enumerate(global_batches):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([slices[i][step][key] for i in range(3)]), batch[key])


def test_few_shot_eval_batches_pad_and_mask():
  few = few_shot_set(5)  # three validation shots, labels 0, 1, 2
  batches = list(data.few_shot_eval_batches(few, "val", batch_size=2, image_size=8))
  assert len(batches) == 2
  masks = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert list(masks) == [1, 1, 1, 0] and list(labels[:3]) == [0, 1, 2]
  assert batches[1]["image"].shape == (2, 8, 8, 3)
  train = list(data.few_shot_eval_batches(few, "train", batch_size=4, image_size=8))
  mask = np.concatenate([b["mask"] for b in train]).astype(bool)
  assert mask.sum() == len(few.images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in train])[mask], few.labels)


@pytest.mark.parametrize("kwargs", [dict(batch_size=5, process_count=2),
                                    dict(batch_size=4, process_index=2, process_count=2),
                                    dict(batch_size=4, seed=-1)])
def test_bad_train_arguments_are_user_errors(kwargs):
  with pytest.raises(UserError):
    data.train_batches(few_shot_set(3), image_size=8, **kwargs)


def test_empty_few_shot_set_is_a_user_error():
  empty = data.FewShotSet([], np.zeros(0, np.int32), [], np.zeros(0, np.int32), 3)
  with pytest.raises(UserError, match="empty"):
    data.train_batches(empty)
