"""Time of every feature-cache method on an ImageNet-shaped few-shot task, on cached features.

For each method of `clip_lora_jax.methods` that runs on cached features, its recipe
(`configs/<method>.py:dataset=imagenet,shots=16`) on a synthetic task of `--classes` classes x
`--shots` shots (16,000 cached shot features at the defaults), the recipe's number of augmented
views of each (`config.views`: 1 for the linear probes, 10 for most, 20 for CLAP, 300 for ProLIP;
capped at `--max-views`, so ProLIP's 300 x 16,000 x 768 floats (14.7 GB) are not built here: its
time per epoch grows with the views) and min(shots, 4) validation shots per class, embedding width
`--dim`: the wall time of the whole solve or training run as train.py runs it
(`feature_cache.init`, the shared loop `training.fit` with its checkpoints, `select`), and the
validation top-1 as a sanity check (the synthetic classes are separable). The features are random
class means plus noise, the zero-shot classifier the noisy class means: no model is involved.

The one-time cost that precedes every method, extracting those features with the frozen
ViT-B/16 image tower, is timed separately on `--extract-batches` batches of 32 and extrapolated
to the task's (10 views + 1) x shots x classes + validation images (the default `config.views`).

  python benchmarks/feature_methods.py                       # 1,000 classes x 16 shots (minutes)
  python benchmarks/feature_methods.py --classes 10 --shots 2 --max-views 2 --extract-batches 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=wrong-import-position,import-outside-toplevel

EXTRACTION_VIEWS = 10  # configs/features.py's default `views`.


def synthetic_task(classes: int, shots: int, views: int, dim: int, width: int | None = None,
                   seed: int = 0):
  """A separable task: unit class means, features = mean + noise (views noisier than shots).
  With `width`, the features are pooled features of that width, and the classifier the noisy
  class means seen through a random (width, dim) projection."""
  import numpy as np

  from clip_lora_jax.methods import feature_cache
  rng = np.random.default_rng(seed)
  space = width or dim
  projection = (rng.standard_normal((space, dim)) / np.sqrt(space)).astype(np.float32)
  means = rng.standard_normal((classes, space)).astype(np.float32)
  means /= np.linalg.norm(means, axis=-1, keepdims=True)
  shot_labels = np.repeat(np.arange(classes, dtype=np.int32), shots)
  noise = lambda n, s, d=space: (s * rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
  shots_x = means[shot_labels] + noise(len(shot_labels), 0.5)
  view_shots = np.concatenate([rng.permutation(len(shot_labels)) for _ in range(views)])
  views_x = shots_x[view_shots] + noise(len(view_shots), 0.3)
  val_labels = np.repeat(np.arange(classes, dtype=np.int32), min(shots, 4))
  classifier = (means @ projection if width else means) + noise(classes, 0.8, dim)
  classifier /= np.linalg.norm(classifier, axis=-1, keepdims=True)
  return feature_cache.Task(views_x, shot_labels[view_shots], view_shots, shots_x, shot_labels,
                            means[val_labels] + noise(len(val_labels), 0.5), val_labels,
                            classifier, projection)


def first_views(task, views: int):
  """`task` with its first `views` augmented views of every shot (the views are stored view by
  view: rows [v N, (v + 1) N) are view v of the N shots)."""
  import dataclasses
  rows = views * len(task.shots)
  return dataclasses.replace(task, views=task.views[:rows], view_labels=task.view_labels[:rows],
                             view_shots=task.view_shots[:rows])


def time_method(name: str, tasks: dict[str, Any], shots: int, max_views: int,
                workdir: str) -> dict[str, Any]:
  """Solves / trains `name` with its ImageNet recipe on the task of its INPUT with the recipe's
  views (at most `max_views`), as feature_cache.run does."""
  import importlib

  import jax

  from clip_lora_jax import metrics, sharding, training
  from clip_lora_jax.methods import METHODS, feature_cache
  from clip_lora_jax import methods as methods_lib
  method = methods_lib.get(name)
  config = importlib.import_module(f"configs.{METHODS[name].config_file}").get_config(
      f"dataset=imagenet,shots={shots},seed=1")
  config.progress = False
  method_config = feature_cache.method_config_from(method, config)
  views = min(config.views, max_views)
  task = first_views(tasks[method.INPUT], views)
  steps = training.total_steps(config, task.num_classes) if hasattr(method, "loss") else 0
  run = training.Run(config, workdir, sharding.make_mesh(), steps, base=None,
                     spec=types.SimpleNamespace(name="imagenet-shaped"))
  start = time.perf_counter()
  params = jax.device_get(method.init(task, method_config))
  with metrics.MetricWriter(workdir, enabled=False) as writer:
    if steps:
      params = feature_cache._fit(run, method, method_config, task, params, writer)  # pylint: disable=protected-access
  if hasattr(method, "select"):
    params = method.select(params, task, method_config)
  logits = method.logits(params, task.val, method_config)
  jax.block_until_ready(logits)
  seconds = time.perf_counter() - start
  return {"method": name, "views": views, "recipe_views": config.views, "steps": steps,
          "seconds": seconds,
          "trainable_parameters": feature_cache.num_parameters(params),
          "val_top1": feature_cache.accuracy(logits, task.val_labels)}


def extraction_rate(batches: int) -> float:
  """Images per second of the frozen ViT-B/16 image tower (random weights, batch 32, fp32)."""
  import jax
  import numpy as np

  from clip_lora_jax import model
  config = model.get_config("ViT-B/16")
  params = model.init_params(jax.random.key(0), config)
  images = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
  jax.block_until_ready(model.encode_image_features(params, images, config))  # compile
  start = time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(model.encode_image_features(params, images, config))
  return 32 * batches / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--shots", type=int, default=16)
  parser.add_argument("--max-views", type=int, default=20,
                      help="at most this many augmented views per shot for any method")
  parser.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/16: 512)")
  parser.add_argument("--width", type=int, default=768,
                      help="pooled feature width, for methods that train the projection")
  parser.add_argument("--methods", default="all", help="comma-separated names, or all")
  parser.add_argument("--extract-batches", type=int, default=2)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  from clip_lora_jax import xla_flags
  xla_flags.use_compilation_cache()
  from clip_lora_jax import methods as methods_lib
  from clip_lora_jax.methods import feature_cache
  names = [n for n in methods_lib.METHODS
           if getattr(methods_lib.get(n), "train_and_evaluate", None) is feature_cache.run]
  if args.methods != "all":
    names = [n for n in args.methods.split(",") if n in names]
  tasks = {"embedding": synthetic_task(args.classes, args.shots, args.max_views, args.dim),
           "features": synthetic_task(args.classes, args.shots, args.max_views, args.dim,
                                      width=args.width)}
  task = tasks["embedding"]
  print(f"task: {args.classes} classes x {args.shots} shots ({len(task.shots):,} shot features, "
        f"up to {len(task.views):,} view features, {len(task.val):,} validation), width "
        f"{args.dim}",
        flush=True)
  rows = []
  for name in names:
    with tempfile.TemporaryDirectory() as workdir:
      row = time_method(name, tasks, args.shots, args.max_views, workdir)
    rows.append(row)
    print(json.dumps(row), flush=True)
  images = (EXTRACTION_VIEWS + 1) * len(task.shots) + len(task.val)
  extraction = None
  if args.extract_batches:
    rate = extraction_rate(args.extract_batches)
    extraction = {"images": images, "images_per_second": rate, "seconds": images / rate}
    print(json.dumps({"feature_extraction": extraction}), flush=True)

  print("\n| method | views (recipe) | steps | trainable params | wall s | val top-1 "
        "(synthetic) |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for row in rows:
    recipe = "" if row["views"] == row["recipe_views"] else f" ({row['recipe_views']})"
    print(f"| {row['method']} | {row['views']}{recipe} | {row['steps']:,} | "
          f"{row['trainable_parameters']:,} | {row['seconds']:.2f} | {row['val_top1']:.1f} |")
  if extraction:
    print(f"\nfeature extraction, ViT-B/16 fp32 on {os.cpu_count()} CPUs: "
          f"{extraction['images_per_second']:.2f} img/s -> {extraction['images']:,} images in "
          f"{extraction['seconds'] / 3600:.1f} h (once per base, dataset, shots, seed)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "methods": rows, "feature_extraction": extraction}, f,
                indent=1)


if __name__ == "__main__":
  main()
