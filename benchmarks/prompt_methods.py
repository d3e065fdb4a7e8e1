"""Train-step time of the prompt-learning methods against CLIP-LoRA's, on the same shape.

Every method runs its own train step as train.py builds it (its recipe's optimizer, the class
prompts "... {name}." packed by `prompts.pack_prompts`), in this process, on random weights and
a fixed synthetic batch of float images (the input pipeline is not measured):

* lora: `methods.lora.make_train_step`, LoRA r = 2 on q, k, v of both towers: both towers
  back-propagate (input gradients through the frozen weights), every class prompt every step;
* coop: 16 context tokens (`methods.prompt_learning.make_train_step`): the image tower runs
  forward only, the text tower back-propagates every class prompt;
* maple: depth 9 (or the towers' depth if smaller), 2 tokens: both towers back-propagate;
* cocoop, kgcoop, prograd on request (`--methods`).

The first call (compilation included) is reported apart; then `--warmup` + `--steps` rounds of
one blocking step of each method in turn (a shared CPU's varying load weighs on all alike), and
the median of the last `--steps` of each.

  python benchmarks/prompt_methods.py --shape ViT-B/16 --batch 8 --classes 10   # README table
  python benchmarks/prompt_methods.py --shape tiny --batch 4 --classes 4 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from clip_lora_jax import xla_flags  # pylint: disable=wrong-import-position  (no JAX import)

METHODS = ("lora", "coop", "maple", "cocoop", "kgcoop", "prograd")


def prompt_step(name: str, base: Any, names: list[str], images: Any, labels: Any
                ) -> tuple[Any, Any, int]:
  """(step, state, trainable parameters) of prompt-learning method `name` as its recipe builds
  them (MaPLe's depth capped at the towers' depth)."""
  import importlib  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import evaluation, methods, training  # pylint: disable=import-outside-toplevel
  from clip_lora_jax.methods import prompt_learning  # pylint: disable=import-outside-toplevel

  method = methods.get(name)
  config = importlib.import_module(f"configs.{methods.METHODS[name].config_file}").get_config()
  section = config[method.SECTION].to_dict()
  if "depth" in section:
    section["depth"] = min(section["depth"], base.config.text.layers, base.config.vision.layers)
  method_config = method.Config.from_dict(section)
  zero_shot = None
  if getattr(method, "ZERO_SHOT", False):
    zero_shot = evaluation.zero_shot_classifier(base.params, base.config, base.tokenizer, names,
                                                ("a photo of a {}.",))
  template = prompt_learning.prompt_template(base.tokenizer, method_config)
  frozen = prompt_learning.make_frozen(base, base.params, names, template, zero_shot)
  optimizer = training.make_optimizer(config.optimizer, 1000, 10)
  params = method.init(jax.random.PRNGKey(0), base, method_config)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": optimizer.init(params)}
  step = prompt_learning.make_train_step(method, method_config, optimizer)
  return ((lambda state: step(state, frozen, images, labels)), state,
          sum(int(x.size) for x in jax.tree.leaves(params)))


def lora_step(base: Any, token_ids: Any, images: Any, labels: Any) -> tuple[Any, Any, int]:
  """(step, state, trainable parameters) of CLIP-LoRA's default step (benchmarks/train_step.py)."""
  from benchmarks.train_step import lora_step_and_state  # pylint: disable=import-outside-toplevel
  from clip_lora_jax import lora  # pylint: disable=import-outside-toplevel
  step, initial_state, text, _ = lora_step_and_state(base.config, lora.LoRAConfig(), token_ids)
  state = initial_state()
  return ((lambda state: step(state, base.params, images, labels, text)), state,
          lora.num_parameters(state["lora"]))


def time_methods(names: list[str], base: Any, class_names: list[str], token_ids: Any,
                 images: Any, labels: Any, steps: int, warmup: int) -> list[dict[str, Any]]:
  """[{'method', 'first_s' (compilation included), 'step_s' (median), 'trainable', 'loss'}]:
  every method's first call, then `warmup` + `steps` rounds of one step of each method in turn,
  so that a load varying over time (a shared CPU) weighs on every method alike."""
  import jax  # pylint: disable=import-outside-toplevel
  runs, states, rows = {}, {}, {}
  for name in names:
    if name == "lora":
      runs[name], state, trainable = lora_step(base, token_ids, images, labels)
    else:
      runs[name], state, trainable = prompt_step(name, base, class_names, images, labels)
    tick = time.perf_counter()
    states[name], _ = jax.block_until_ready(runs[name](state))
    rows[name] = {"method": name, "first_s": time.perf_counter() - tick, "times": [],
                  "trainable": trainable}
  for round_ in range(warmup + steps):
    for name in names:
      tick = time.perf_counter()
      states[name], step_metrics = jax.block_until_ready(runs[name](states[name]))
      if round_ >= warmup:
        rows[name]["times"].append(time.perf_counter() - tick)
      rows[name]["loss"] = float(step_metrics["loss"])
  for row in rows.values():
    row["step_s"] = statistics.median(row["times"])
  return list(rows.values())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="ViT-B/16", help="an architecture of clip_lora_jax.model")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--methods", default="lora,coop,maple",
                      help=f"comma-separated, of {', '.join(METHODS)}")
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args(argv)
  chosen = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(chosen) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
  xla_flags.use_fast_cpu_flags()
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from benchmarks.train_step import TEMPLATE, class_names  # pylint: disable=import-outside-toplevel
  from clip_lora_jax import base as base_lib  # pylint: disable=import-outside-toplevel

  base = base_lib.load_base_model(args.shape, random_init=True)
  names = class_names(args.classes, base.tokenizer)
  token_ids = base.tokenizer([TEMPLATE.format(n) for n in names])
  size = base.config.vision.image_size
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.standard_normal((args.batch, size, size, 3), np.float32))
  labels = jax.device_put((np.arange(args.batch) % args.classes).astype(np.int32))
  print(f"{args.shape}, batch {args.batch}, {args.classes} classes, {jax.devices()[0].platform}; "
        f"median of {args.steps} steps after {args.warmup}", flush=True)
  print("| method | trainable | first call (s, compile included) | s / step |", flush=True)
  print("| --- | ---: | ---: | ---: |", flush=True)
  rows = time_methods(chosen, base, names, token_ids, images, labels, args.steps, args.warmup)
  for row in rows:
    print(f"| {row['method']} | {row['trainable']:,} | {row['first_s']:.1f} | "
          f"{row['step_s']:.3f} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
