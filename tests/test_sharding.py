"""Data-parallel and FSDP training over 8 simulated CPU devices equals single-device training."""

import json
import os
import subprocess
import sys

import numpy as np

from clip_lora_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_steps_equal_single_device_steps():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests/multidevice/sharded_steps.py")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  diffs = json.loads(out.stdout.strip().splitlines()[-1])
  assert diffs["moved"] > 1e-3  # The adapter trained: the comparison is not of zeros.
  # fp32, 4 AdamW steps: sharding changes only the order of the reductions.
  assert diffs["data"] < 1e-5, diffs
  assert diffs["fsdp"] < 1e-5, diffs
  assert diffs["features"] < 1e-5, diffs  # frozen embeddings gathered from 8 devices


def test_fsdp_spec_shards_large_divisible_axes_only():
  assert sharding.fsdp_spec((768, 3072), 8) == sharding.P(None, "data")
  assert sharding.fsdp_spec((49408, 512), 8) == sharding.P("data", None)
  assert sharding.fsdp_spec((768,), 8) == sharding.P()  # small: replicated
  assert sharding.fsdp_spec((1001, 777), 8) == sharding.P()  # indivisible


def test_pad_to_multiple():
  x = np.arange(10).reshape(5, 2)
  padded = sharding.pad_to_multiple(x, 4)
  assert padded.shape == (8, 2) and (padded[:5] == x).all() and (padded[5:] == x[0]).all()
  assert sharding.pad_to_multiple(x, 5) is x
