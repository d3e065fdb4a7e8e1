"""Image-encoder throughput of ours (JAX, jit) side by side with transformers' CLIPModel (torch).

Both run the same random ViT-B/16 weights (ours exported to the torch model with
`checkpoints.params_to_hf`) on the same random batch, fp32, on the CPU, in one process. Runs of
the two are interleaved so that a change in machine load hits both alike; each side reports the
median of its timed runs after warm-up (which includes XLA compilation for ours).

  python benchmarks/image_encoder.py [--arch ViT-B/16] [--batch 32] [--runs 5] [--threads 2]

torch is only the point of comparison here (a test extra), never a dependency of the library.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import numpy as np
import torch
import transformers

from clip_lora_jax import checkpoints, model, xla_flags


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--arch", default="ViT-B/16", help="named architecture (random weights)")
  parser.add_argument("--batch", type=int, default=32, help="images per call")
  parser.add_argument("--runs", type=int, default=5, help="timed runs per implementation")
  parser.add_argument("--warmup", type=int, default=2, help="untimed runs per implementation")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  return parser.parse_args()


def timed(fn) -> float:
  """Seconds one call of `fn` takes."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  args = parse_args()
  xla_flags.use_fast_cpu_flags()  # As train.py and eval.py do, before JAX's first computation.
  torch.set_num_threads(args.threads)
  cfg = model.get_config(args.arch)
  params = model.init_params(jax.random.key(0), cfg)
  size = cfg.vision.image_size
  images = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)

  encode = jax.jit(model.encode_images, static_argnums=2)
  run_ours = lambda: encode(params, images, cfg).block_until_ready()

  hf_config = transformers.CLIPConfig.from_dict(checkpoints.config_to_hf(cfg))
  hf_model = transformers.CLIPModel(hf_config)
  state = checkpoints.params_to_hf(params, cfg)
  hf_model.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
  hf_model.eval()
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

  def run_torch() -> torch.Tensor:
    with torch.inference_mode():
      return hf_model.get_image_features(pixels).pooler_output

  max_diff = float(np.abs(np.asarray(run_ours()) - run_torch().numpy()).max())
  for _ in range(args.warmup):
    run_ours(), run_torch()
  times = {"ours (JAX, jit)": [], "transformers (torch)": []}
  for _ in range(args.runs):
    times["ours (JAX, jit)"].append(timed(run_ours))
    times["transformers (torch)"].append(timed(run_torch))

  print(f"command: python {shlex.join(sys.argv)}")
  print(f"{args.arch}, batch {args.batch}, fp32, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.devices()[0].platform}), torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads, attention "
        f"{hf_model.config._attn_implementation}), transformers {transformers.__version__}")
  print(f"max abs difference of the embeddings: {max_diff:.2e}")
  throughput = {}
  for name, seconds in times.items():
    median = statistics.median(seconds)
    throughput[name] = args.batch / median
    runs = ", ".join(f"{s:.2f}" for s in seconds)
    print(f"{name:22s} {throughput[name]:7.1f} images/s  "
          f"(median {median:.3f} s/batch; runs {runs})")
  ours, theirs = throughput.values()
  print(f"ratio ours / transformers: {ours / theirs:.2f}")


if __name__ == "__main__":
  main()
