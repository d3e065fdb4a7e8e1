"""The methods side by side: CLIP-LoRA, Block-LoRA (both partitions) and LLU at one shape.

For each method, in its own subprocess (so peak memory does not mix): trainable parameters, the
train-step time (median of `--steps` after `--warmup`), the peak resident memory (VmHWM) and the
size of the adapter file `train.py` writes. Random weights, synthetic data, fp32, as
benchmarks/train_step.py (whose helpers this reuses):

* CLIP-LoRA, Block-LoRA: `methods.lora.make_train_step` at batch `--batch` with every class prompt
  re-encoded with gradients (the text tower trains), q, k, v of both towers, rank 2. Block-LoRA
  'input' cuts the input into 8 chunks sharing A_s (configs/block_lora.py); 'rank' cuts the
  rank 2 into 2 blocks of rank 1 sharing A_s.
* LLU: its step on cached embeddings (`llu.make_train_step`, batch 256, configs/llu.py) of
  10 views x `--shots` x classes images, anchors the clean shots and the class prompts. Its
  one-time cost, embedding those views with the frozen image tower, is timed on two batches
  and extrapolated (`one-time s`).

  python benchmarks/methods.py                       # ViT-B/16, 10 classes, 16 shots (minutes)
  python benchmarks/methods.py --shape tiny --steps 2 --warmup 1   # smoke check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=wrong-import-position
from benchmarks.train_step import (TEMPLATE, child_result, class_names, gib,
                                    lora_step_and_state, peak_rss_bytes, time_steps)
from clip_lora_jax import xla_flags  # (no JAX import)

METHODS = {
    "lora": ("CLIP-LoRA", {}),
    "block_lora_input": ("Block-LoRA, input split (8 blocks)", {"split": "input", "blocks": 8}),
    "block_lora_rank": ("Block-LoRA, rank split (2 blocks)", {"split": "rank", "blocks": 2}),
    "llu": ("LLU (on cached embeddings)", {}),
}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one child process runs."""
  impl: str  # a METHODS key
  shape: str
  batch: int
  classes: int
  shots: int
  token_ids: list[list[int]]
  steps: int
  warmup: int


def run_weight_adapter(spec: Spec) -> dict[str, Any]:
  """CLIP-LoRA or Block-LoRA: the train step of `train.py`, the adapter file it writes."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import lora, model  # pylint: disable=import-outside-toplevel
  from clip_lora_jax.methods import block_lora  # pylint: disable=import-outside-toplevel

  cfg = model.get_config(spec.shape)
  params = model.init_params(jax.random.key(0), cfg)
  options = METHODS[spec.impl][1]
  lora_cfg = block_lora.BlockLoRAConfig(**options) if options else lora.LoRAConfig()
  step, initial_state, text, _ = lora_step_and_state(cfg, lora_cfg, spec.token_ids)
  state = initial_state()
  rng = np.random.default_rng(0)
  size = cfg.vision.image_size
  images = jnp.asarray(rng.standard_normal((spec.batch, size, size, 3), np.float32))
  labels = jnp.asarray(np.arange(spec.batch) % spec.classes, jnp.int32)
  compiled = step.lower(state, params, images, labels, text).compile()

  def run_step() -> None:
    nonlocal state
    state, metrics = compiled(state, params, images, labels, text)
    jax.block_until_ready((state, metrics))

  times = time_steps(run_step, spec)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "adapter.safetensors")
    lora.save_adapter(path, lora.Adapter(jax.device_get(state["lora"]), lora_cfg, spec.shape, cfg,
                                         lora.base_fingerprint(params)))
    file_bytes = os.path.getsize(path)
  return {"times": times, "trainable": lora.num_parameters(state["lora"]),
          "file_bytes": file_bytes, "one_time_s": None}


def run_llu(spec: Spec) -> dict[str, Any]:
  """LLU: the feature pass it needs once (timed on two batches), then its step on embeddings."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  # pylint: disable=import-outside-toplevel
  from clip_lora_jax import features, lora, model, training
  from clip_lora_jax.methods import feature_cache, llu
  from configs import llu as llu_configs  # pylint: disable=import-outside-toplevel

  cfg = model.get_config(spec.shape)
  params = model.init_params(jax.random.key(0), cfg)
  config = llu_configs.get_config()
  llu_cfg = llu.LLUConfig.from_dict(config.llu.to_dict())
  rng = np.random.default_rng(0)
  size = cfg.vision.image_size
  views = llu_cfg.views * spec.shots * spec.classes
  images = rng.standard_normal((spec.batch, size, size, 3), np.float32)
  encode = lambda: jax.block_until_ready(features.encode(params, cfg, images))
  encode()
  tick = time.perf_counter()
  for _ in range(2):
    encode()
  one_time_s = (time.perf_counter() - tick) / 2 * (views + spec.shots * spec.classes) / spec.batch

  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  text = jnp.asarray(unit(rng.standard_normal((spec.classes, cfg.embed_dim))), jnp.float32)
  shots = unit(rng.standard_normal((spec.shots * spec.classes, cfg.embed_dim)))
  view_emb = np.repeat(shots, llu_cfg.views, axis=0) + 0.1 * rng.standard_normal(
      (views, cfg.embed_dim))
  view_labels = np.repeat(np.arange(spec.shots * spec.classes) % spec.classes, llu_cfg.views)
  anchors = {"image": llu.cluster_anchors(shots, llu_cfg.image_clusters),
             "text": llu.cluster_anchors(np.asarray(text), llu_cfg.text_clusters)}
  optimizer = training.make_optimizer(config.optimizer, config.total_steps)
  fresh = llu.init(cfg.embed_dim, llu_cfg)
  state = {"step": jnp.zeros((), jnp.int32), "llu": fresh, "opt_state": optimizer.init(fresh)}
  step = llu.make_train_step(llu_cfg, optimizer)

  def run_step() -> None:
    nonlocal state
    rows = feature_cache.batch_indices(views, config.batch_size, 0, int(state["step"]))
    state, metrics = step(state, jnp.asarray(view_emb[rows], jnp.float32),
                          jnp.asarray(view_labels[rows], jnp.int32), text, anchors)
    jax.block_until_ready((state, metrics))

  times = time_steps(run_step, dataclasses.replace(spec, steps=max(spec.steps, 20)))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "adapter.safetensors")
    llu.save_adapter(path, llu.Adapter(jax.device_get(state["llu"]), anchors, llu_cfg,
                                       spec.shape, cfg, lora.base_fingerprint(params)))
    file_bytes = os.path.getsize(path)
  return {"times": times, "trainable": llu.num_parameters(state["llu"]),
          "file_bytes": file_bytes, "one_time_s": one_time_s}


def run_child(spec: Spec) -> dict[str, Any]:
  """Runs `spec.impl` in a fresh interpreter with train.py's XLA flags."""
  env = dict(os.environ)
  xla_flags.use_fast_cpu_flags(env)
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(dataclasses.asdict(spec), f)
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--spec", f.name],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
  finally:
    os.remove(f.name)
  return child_result(proc)


def report(spec: Spec, results: dict[str, dict[str, Any]]) -> None:
  print(f"\n### {spec.shape}, {spec.classes} classes, {spec.shots} shots, fp32 "
        f"(median of {spec.steps} steps after {spec.warmup} warm-up; LLU: of at least 20)\n")
  print("| method | trainable params | s / step | step time vs CLIP-LoRA | one-time s | "
        "peak RSS GiB | adapter file KB |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  lora_median = statistics.median(results["lora"]["times"]) if "times" in results.get(
      "lora", {}) else None
  for impl, r in results.items():
    if "error" in r:
      print(f"| {METHODS[impl][0]} | {r['error']} | | | | | |")
      continue
    median = statistics.median(r["times"])
    ratio = f"{median / lora_median:.3g}x" if lora_median else "-"
    one_time = "-" if r["one_time_s"] is None else f"{r['one_time_s']:.0f}"
    print(f"| {METHODS[impl][0]} | {r['trainable']:,} | {median:.3g} | {ratio} | {one_time} | "
          f"{gib(r['peak_rss'])} | {r['file_bytes'] / 1024:.0f} |")


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="ViT-B/16", help="architecture (`tiny`: a smoke check)")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--shots", type=int, default=16)
  p.add_argument("--batch", type=int, default=32, help="images per CLIP-LoRA / Block-LoRA step")
  p.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
  p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of "
                 f"{', '.join(METHODS)}")
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.spec:
    with open(args.spec) as f:
      spec = Spec(**json.load(f))
    result = run_llu(spec) if spec.impl == "llu" else run_weight_adapter(spec)
    print("RESULT " + json.dumps({**result, "peak_rss": peak_rss_bytes()}))
    return
  methods = args.methods.split(",")
  unknown = set(methods) - set(METHODS)
  if unknown or args.steps < 1 or args.warmup < 0 or min(args.classes, args.shots, args.batch) < 1:
    p.error(f"--methods must name {', '.join(METHODS)} (got {sorted(unknown)}); --steps, "
            "--classes, --shots, --batch >= 1; --warmup >= 0")
  from clip_lora_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = load_tokenizer()
  names = class_names(args.classes, tokenizer)
  spec = Spec("", args.shape, args.batch, args.classes, args.shots,
              tokenizer([TEMPLATE.format(n) for n in names]).tolist(), args.steps, args.warmup)
  print(f"command: {shlex.join([os.path.relpath(sys.executable, REPO_ROOT), *sys.argv])}")
  print(f"machine: {os.cpu_count()} CPUs; load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  results = {}
  for impl in methods:
    print(f"running {impl} ...", file=sys.stderr)
    results[impl] = run_child(dataclasses.replace(spec, impl=impl))
  report(spec, results)
  print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
