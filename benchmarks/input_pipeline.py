"""Input-pipeline throughput: CLIP-LoRA train augmentation (and test preprocessing), images/s.

A synthetic few-shot set of JPEG images (by default 10 classes x 16 shots of 500 x 375, the
typical size of an ImageNet photo) goes through `data.train_batches`: JPEG decoding,
RandomResizedCrop to 224 (bicubic), flip, CLIP normalisation, batching. After `--warmup` batches,
`--batches` batches are timed; the best of `--repeats` timings is reported, as images per second.
The same images then go through the test preprocessing (`data.few_shot_eval_batches`: decode,
shortest side to 224, central crop) for an eval-side figure.

Compare with the train step's consumption, batch / (seconds per step) (benchmarks/train_step.py):
the pipeline runs ahead in tf.data threads, so it is not the bottleneck while its rate is higher.

  python benchmarks/input_pipeline.py [--batch 32] [--image-size 224] [--width 500 --height 375]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import sys
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from clip_lora_jax import data


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=32, help="images per batch")
  parser.add_argument("--image-size", type=int, default=224, help="output side")
  parser.add_argument("--width", type=int, default=500, help="source JPEG width")
  parser.add_argument("--height", type=int, default=375, help="source JPEG height")
  parser.add_argument("--images", type=int, default=160, help="images in the few-shot set")
  parser.add_argument("--warmup", type=int, default=5, help="untimed batches")
  parser.add_argument("--batches", type=int, default=30, help="timed batches per repeat")
  parser.add_argument("--repeats", type=int, default=3, help="timings; the best is reported")
  return parser.parse_args()


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A photo-like JPEG: smooth colour fields plus a little noise (compresses like a photo)."""
  coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
  noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def few_shot_set(args: argparse.Namespace) -> data.FewShotSet:
  rng = np.random.default_rng(0)
  images = [synthetic_jpeg(rng, args.width, args.height) for _ in range(args.images)]
  labels = np.arange(args.images, dtype=np.int32) % 10
  return data.FewShotSet(images, labels, images, labels, 10)


def images_per_second(make_batches, batch: int, args: argparse.Namespace) -> float:
  """Best images/s over `repeats` timings of `batches` batches, after `warmup` batches."""
  best = 0.0
  for _ in range(args.repeats):
    batches = make_batches()
    for _ in range(args.warmup):
      next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
      next(batches)
    best = max(best, args.batches * batch / (time.perf_counter() - start))
  return best


def main() -> None:
  args = parse_args()
  few = few_shot_set(args)
  mean_kb = np.mean([len(image) for image in few.images]) / 1024
  print(f"command: python {shlex.join(sys.argv)}")
  print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"TensorFlow {tf.__version__}")
  print(f"images: {args.images} JPEGs of {args.width}x{args.height} ({mean_kb:.0f} KiB mean), "
        f"batch {args.batch}, output {args.image_size}x{args.image_size}")

  train = images_per_second(
      lambda: data.train_batches(few, args.batch, args.image_size, seed=0), args.batch, args)
  print(f"train augmentation (decode, RandomResizedCrop, flip, normalise): {train:.0f} images/s "
        f"= {train / args.batch:.1f} batches/s")

  def eval_batches():  # the val shots repeated, so that enough batches exist
    while True:
      yield from data.few_shot_eval_batches(few, "val", args.batch, args.image_size)
  test = images_per_second(eval_batches, args.batch, args)
  print(f"test preprocessing (decode, resize shortest side, center crop, normalise): "
        f"{test:.0f} images/s")


if __name__ == "__main__":
  main()
