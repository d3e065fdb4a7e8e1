"""Where the CLIP-LoRA train step's time goes on CPU: the step as train.py runs it, against the
same step with the attention core replaced, and with freed memory kept in the process.

Each variant runs in its own process (ViT-B/16 shape, batch 32, random weights, 10 classes, the
step of `benchmarks/train_step.py`) and reports per step: wall time (median), CPU time in user
and kernel mode, minor page faults, XLA's temporary buffer size and the peak RSS.

* `step`: the train step as train.py builds it.
* `no_attention_core`: softmax(q k^T) v replaced by `v + 0 * (q + k)`, so the q, k and v
  projections, their low-rank branches and every other part keep their work: the difference to
  `step` is the attention core's cost (forward and backward). Not a model, a measurement.
* `keep_freed_memory`: `step` under glibc tunables that keep freed memory in the process
  (one arena, no mmap, no trimming): the difference to `step` is what page faults cost. XLA's
  CPU runtime allocates each step's temporary buffer anew, so without this every step faults it
  in from the kernel. Not used by train.py: its peak memory depends on heap fragmentation.

  python benchmarks/train_step.py ...          # the speed against the peer
  python benchmarks/step_breakdown.py          # this breakdown (about 8 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # pylint: disable=wrong-import-position  (benchmarks/train_step.py)

KEEP_FREED_MEMORY = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                     "glibc.malloc.trim_threshold=1099511627776")
VARIANTS = ("step", "no_attention_core", "keep_freed_memory")


def run_variant(variant: str, classes: int, steps: int) -> dict:
  """Times `steps` train steps (after one warm-up) in this process."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from clip_lora_jax import lora, model  # pylint: disable=import-outside-toplevel
  from clip_lora_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  if variant == "no_attention_core":
    jax.nn.dot_product_attention = lambda q, k, v, is_causal=False: v + 0.0 * (q + k)
  cfg = model.get_config("ViT-B/16")
  tokenizer = load_tokenizer()
  ids = tokenizer([train_step.TEMPLATE.format(n)
                   for n in train_step.class_names(classes, tokenizer)])
  params = model.init_params(jax.random.key(0), cfg)
  step, initial_state, text, _ = train_step.lora_step_and_state(cfg, lora.LoRAConfig(), ids)
  state = initial_state()
  spec = argparse.Namespace(batch=32, image_size=cfg.vision.image_size, classes=classes)
  images, labels = (jnp.asarray(x) for x in train_step.images_and_labels(spec))
  compiled = step.lower(state, params, images, labels, text).compile()
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  rows = []
  for i in range(steps + 1):
    before, tick = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    state, metrics = compiled(state, params, images, labels, text)
    jax.block_until_ready((state, metrics))
    after = resource.getrusage(resource.RUSAGE_SELF)
    if i:  # The first call is the warm-up.
      rows.append((time.perf_counter() - tick, after.ru_utime - before.ru_utime,
                   after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    print(f"  [{variant}] step {i}: {time.perf_counter() - tick:.2f} s", file=sys.stderr)
  wall, user, system, faults = (statistics.median(column) for column in zip(*rows))
  return {"wall": wall, "user": user, "sys": system, "faults": faults, "temp": temp_bytes,
          "peak_rss": train_step.peak_rss_bytes()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
  p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
  args = p.parse_args()
  if args.variant:
    print("RESULT " + json.dumps(run_variant(args.variant, args.classes, args.steps)))
    return
  print(f"command: python benchmarks/step_breakdown.py --classes {args.classes} "
        f"--steps {args.steps}\nload average before: {os.getloadavg()[0]:.2f}\n")
  print("| variant | s / step | CPU user s | CPU kernel s | minor page faults | XLA temp GiB "
        "| peak RSS GiB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for variant in VARIANTS:
    env = dict(os.environ)
    train_step.xla_flags.use_fast_cpu_flags(env)  # As train.py does.
    if variant == "keep_freed_memory":
      env["GLIBC_TUNABLES"] = KEEP_FREED_MEMORY
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant,
                           "--classes", str(args.classes), "--steps", str(args.steps)],
                          env=env, cwd=train_step.REPO_ROOT, stdout=subprocess.PIPE, text=True,
                          check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"| {variant} | exit status {proc.returncode} | | | | | |")
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    print(f"| {variant} | {r['wall']:.2f} | {r['user']:.1f} | {r['sys']:.1f} | {r['faults']:,.0f} "
          f"| {r['temp'] / 2**30:.2f} | {r['peak_rss'] / 2**30:.2f} |", flush=True)
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
