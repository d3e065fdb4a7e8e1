"""Shared test fixtures: small random-weight CLIP checkpoints built locally with transformers.

torch and transformers' PyTorch `CLIPModel` serve only as the reference oracle here; the
library never imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from benchmarks.train_step import hide_unusable_torchvision
from clip_lora_jax import xla_flags


hide_unusable_torchvision()  # The torch oracle of these tests needs none of it.

# In-process tests run JAX as train.py / eval.py do (same XLA flags, hence the same programs):
# results compared with those of the command lines can then be equal to the bit.
xla_flags.use_fast_cpu_flags()

# Fixtures of the method tests, registered here: a second conftest module would shadow this one
# for the tests that import it by name.
pytest_plugins = ["tests.methods.synthetic_tasks"]

# The `tiny` architecture of clip_lora_jax.model, as a transformers config.
TINY_HF_CONFIG = {
    "projection_dim": 32,
    "text_config": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                      "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
}


def random_hf_clip(config: dict, seed: int = 0):
  """A `transformers.CLIPModel` for `config` (a config.json dict) in eval mode, with every
  parameter perturbed by N(0, 0.02) noise so that no bias is zero and no norm is the identity
  (a mapping bug between, say, the q and k biases would otherwise go unnoticed)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p), alpha=0.02)
  return model


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory) -> str:
  """Directory of a random-weight Hugging Face checkpoint of the `tiny` architecture:
  `config.json`, `model.safetensors` and CLIP's tokenizer files, as `save_pretrained` writes
  them."""
  from clip_lora_jax import tokenizer

  directory = tmp_path_factory.mktemp("tiny_hf_checkpoint")
  random_hf_clip(TINY_HF_CONFIG).save_pretrained(directory)
  backend = tokenizer.load_tokenizer().backend
  backend.model_max_length = 77
  backend.save_pretrained(directory)
  return str(directory)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference run of the end-to-end tests (train.py on configs/runlocal.py); the killed-and-
# resumed runs of tests/test_train_e2e.py and tests/test_multiprocess.py repeat these overrides.
RUNLOCAL_OVERRIDES = ("--config.total_steps=40", "--config.checkpoint_every=10",
                      "--config.eval_every=20", "--config.export_merged=True")
# The environment of train.py / eval.py subprocesses; their persistent compilation cache is one
# per test session (never the user's), so runs of the same programs compile them once.
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
       "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="clip_lora_jax_test_compilation_")}


def train_cmd(workdir: str, *overrides: str, config_arg: str = "") -> list[str]:
  """train.py on configs/runlocal.py (with `config_arg`, e.g. `:method=block_lora`)."""
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
          os.path.join(ROOT, "configs/runlocal.py") + config_arg, "--workdir", workdir,
          "--config.progress=False", *overrides]


@pytest.fixture(scope="session")
def runlocal_run(tmp_path_factory) -> tuple[str, str, str]:
  """(workdir, stdout, stderr) of one uninterrupted `train.py` run with RUNLOCAL_OVERRIDES,
  shared by the tests that check its outputs and those that compare killed-and-resumed runs with
  it. Tests that run in its workdir again work on a copy."""
  workdir = str(tmp_path_factory.mktemp("runlocal") / "run")
  out = subprocess.run(train_cmd(workdir, *RUNLOCAL_OVERRIDES), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out.stdout, out.stderr
