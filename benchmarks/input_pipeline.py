"""Input-pipeline throughput: CLIP-LoRA train augmentation (and test preprocessing), images/s.

A synthetic few-shot set of JPEG images (by default 10 classes x 16 shots of 500 x 375, the
typical size of an ImageNet photo) goes through `data.train_batches` with 1, 2, ... worker
threads (`--workers`): RandomResizedCrop to 224 (PIL bicubic), flip, batching of uint8 pixels;
each image is decoded once, in the first epoch, which the `--warmup` batches cover. Then
`--batches` batches are timed; the best of `--repeats` timings is reported, as images per second.
The same images then go through the test preprocessing (`data.few_shot_eval_batches`, tf.data:
decode, shortest side to 224, central crop, normalisation) for an eval-side figure.

Compare with the train step's consumption, batch / (seconds per step) (benchmarks/train_step.py,
benchmarks/gpu.py): the pipeline runs ahead in its threads, so it is not the bottleneck while
its rate is higher.

  python benchmarks/input_pipeline.py [--workers 1,2] [--batch 32] [--width 500 --height 375]
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
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip_lora_jax import data  # pylint: disable=wrong-import-position


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=32, help="images per batch")
  parser.add_argument("--image-size", type=int, default=224, help="output side")
  parser.add_argument("--width", type=int, default=500, help="source JPEG width")
  parser.add_argument("--height", type=int, default=375, help="source JPEG height")
  parser.add_argument("--images", type=int, default=160, help="images in the few-shot set")
  parser.add_argument("--workers", default="1,2", help="comma-separated worker-thread counts")
  parser.add_argument("--warmup", type=int, default=6, help="untimed batches (the first epoch)")
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
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (the eval side only)
  args = parse_args()
  few = few_shot_set(args)
  mean_kb = np.mean([len(image) for image in few.images]) / 1024
  print(f"command: python {shlex.join(sys.argv)}")
  print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"TensorFlow {tf.__version__}")
  print(f"images: {args.images} JPEGs of {args.width}x{args.height} ({mean_kb:.0f} KiB mean), "
        f"batch {args.batch}, output {args.image_size}x{args.image_size}")

  for workers in (int(w) for w in args.workers.split(",")):
    train = images_per_second(
        lambda: data.train_batches(few, args.batch, args.image_size, seed=0, workers=workers),
        args.batch, args)
    print(f"train augmentation (RandomResizedCrop, flip; decoded once), {workers} worker "
          f"thread(s): {train:.0f} images/s = {train / args.batch:.1f} batches/s")

  def eval_batches():  # the val shots repeated, so that enough batches exist
    while True:
      yield from data.few_shot_eval_batches(few, "val", args.batch, args.image_size)
  test = images_per_second(eval_batches, args.batch, args)
  print(f"test preprocessing (decode, resize shortest side, center crop, normalise): "
        f"{test:.0f} images/s")


if __name__ == "__main__":
  main()
