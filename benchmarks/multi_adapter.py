"""Throughput of many LoRA adapters in one batch (`clip_lora_jax.multi_adapter`) against the
ways to serve the same mixed batch with merged weights.

A batch of images whose examples belong to N tasks (task ids drawn uniformly, seeded), each task
a random rank-2 CLIP-LoRA adapter (q, k, v, both towers) with 10 classes:

  multi      one call: each example through its own task's low-rank branch (nothing merged);
  (a) merge  per task present in the batch: merge its adapter into the base, run its examples;
             tasks one after another (what serving mixed tasks with merged weights costs);
  (a') held  as (a) with the N merged models built beforehand and kept (N copies of the weights);
  (b) single the whole batch through one merged adapter: plain CLIP's cost, the upper bound.

Times are medians over timed rounds after a warm-up round (which compiles every shape, including
each task's sub-batch size in (a)); a round runs every variant once, so a change in the machine's
load hits all alike. Class embeddings are computed before timing, for every variant.

  python benchmarks/multi_adapter.py                        # CPU: the `small` architecture
  python benchmarks/multi_adapter.py --shape ViT-B/16 --batch 256   # a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from clip_lora_jax import base as base_lib
from clip_lora_jax import evaluation, lora, model, multi_adapter, tokenizer, xla_flags

# A CPU-sized CLIP: ViT-B's layout at a quarter of its width and half its depth, 64-pixel images.
SMALL = model.CLIPConfig(
    embed_dim=256, vision=model.VisionConfig(256, 6, 4, 1024, 64, 8),
    text=model.TextConfig(256, 6, 4, 1024), name="small")
CLASSES = 10


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", default="small",
                      help=f"small, or a named architecture ({', '.join(model.ARCHITECTURES)})")
  parser.add_argument("--tasks", default="1,8,64", help="comma-separated task counts N")
  parser.add_argument("--batch", type=int, default=64, help="images per batch")
  parser.add_argument("--runs", type=int, default=7, help="timed rounds")
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (compilation)")
  return parser.parse_args()


def random_adapters(base: base_lib.BaseModel, count: int) -> list[lora.Adapter]:
  """`count` CLIP-LoRA adapters (the recipe's defaults) with random factors, b != 0."""
  config = lora.LoRAConfig()
  shapes = lora.abstract_init(base.config, config)
  adapters = []
  for seed in range(count):
    rng = np.random.default_rng(seed)
    factors = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), shapes)
    adapters.append(lora.Adapter(factors, config, base.name, base.config, base.fingerprint))
  return adapters


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int,
                        warmup: int) -> dict[str, float]:
  """Median wall time of each of `fns` (its result waited for) over `runs` rounds after `warmup`
  rounds; each round calls every one in turn, so a change in machine load hits all alike."""
  times: dict[str, list[float]] = {name: [] for name in fns}
  for round_ in range(warmup + runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      if round_ >= warmup:
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def measure(base: base_lib.BaseModel, tasks: int, batch: int, runs: int,
            warmup: int) -> tuple[dict[str, float], int]:
  """Images per second of each variant for N = `tasks`, and how many tasks the batch holds."""
  adapters = random_adapters(base, tasks)
  names = [f"class {c}" for c in range(CLASSES)]
  serve = multi_adapter.MultiAdapterClassifier.build(
      base, adapters, [names] * tasks, [["a photo of a {}."]] * tasks)
  size = base.config.vision.image_size
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.standard_normal((batch, size, size, 3)).astype(np.float32))
  task_ids = rng.integers(0, tasks, batch)
  groups = {t: np.flatnonzero(task_ids == t) for t in np.unique(task_ids)}
  held = {t: lora.merge(base.params, adapters[t].lora, adapters[t].config) for t in groups}

  def per_task(merge: bool) -> list[jax.Array]:
    out = []
    for t, rows in groups.items():
      params = lora.merge(base.params, adapters[t].lora, adapters[t].config) if merge else held[t]
      out.append(evaluation.clip_logits_fn(params, base.config, serve.classifiers[t])(
          images[rows]))
    return out

  single = evaluation.clip_logits_fn(held[next(iter(groups))], base.config, serve.classifiers[0])
  seconds = interleaved_medians({
      "multi": lambda: serve(images, task_ids), "merge": lambda: per_task(True),
      "held": lambda: per_task(False), "single": lambda: single(images)}, runs, warmup)
  return {name: batch / s for name, s in seconds.items()}, len(groups)


def main() -> None:
  args = parse_args()
  xla_flags.use_fast_cpu_flags()  # As train.py and eval.py do, before JAX's first computation.
  config = SMALL if args.shape == "small" else model.get_config(args.shape)
  params = model.init_params(jax.random.key(0), config)
  base = base_lib.BaseModel(config.name, config, params,
                            tokenizer.load_tokenizer(None, config.text.context_length))
  device = jax.devices()[0]
  print(f"command: python {shlex.join(sys.argv)}")
  print(f"{args.shape}, batch {args.batch}, fp32, rank-2 LoRA on q, k, v of both towers, "
        f"{CLASSES} classes per task; {device.platform} ({device.device_kind}), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}")
  header = ("N", "tasks in batch", "multi img/s", "(a) merge img/s", "(a') held img/s",
            "(b) single img/s", "multi / (a)", "multi / (a')", "multi / (b)")
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join(" ---: " for _ in header) + "|")
  for tasks in (int(n) for n in args.tasks.split(",")):
    r, present = measure(base, tasks, args.batch, args.runs, args.warmup)
    print(f"| {tasks} | {present} | {r['multi']:.1f} | {r['merge']:.1f} | {r['held']:.1f} | "
          f"{r['single']:.1f} | {r['multi'] / r['merge']:.2f}x | {r['multi'] / r['held']:.2f}x | "
          f"{r['multi'] / r['single']:.2f}x |", flush=True)

if __name__ == "__main__":
  main()
