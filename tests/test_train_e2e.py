"""train.py and eval.py end to end on the runlocal config (tiny random CLIP, mock EuroSAT)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import transformers

from clip_lora_jax import block_lora, lora
from configs import runlocal

from conftest import ENV, ROOT, RUNLOCAL_OVERRIDES, train_cmd


def load_eval_module():
  """eval.py as a module, loaded once per process (it defines absl flags, which may not be
  defined twice)."""
  if "eval_cli" not in sys.modules:
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["eval_cli"] = module
  return sys.modules["eval_cli"]


def read_adapter(workdir: str) -> lora.Adapter:
  return lora.load_adapter(os.path.join(workdir, "adapter.safetensors"))


def test_train_writes_adapter_metrics_results_and_eval_agrees(runlocal_run):
  workdir, stdout = runlocal_run
  assert "test top-1" in stdout

  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["steps"] == 40 and results["dataset"] == "eurosat" and results["shots"] == 2
  assert 0 <= results["test_top1"] <= results["test_top5"] <= 100 and results["test_count"] > 0
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == list(range(5, 41, 5))
  assert all(np.isfinite(r["train/loss"]) and r["train/learning_rate"] > 0
             for r in records if "train/loss" in r)
  assert [r["step"] for r in records if "val/top1" in r] == [20]
  assert any("test/top1" in r for r in records)
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)[-1] == "40"

  adapter = read_adapter(workdir)
  assert adapter.base_name == "tiny" and adapter.config == lora.LoRAConfig()
  # Mock EuroSAT without a split file: the numpy sampler, recorded with the run.
  assert json.load(open(os.path.join(workdir, "config.json")))["sampler"] == "numpy"
  assert adapter.few_shot == {"dataset": "eurosat", "shots": 2, "seed": 1, "sampler": "numpy"}
  assert any(np.any(leaf) for leaf in jax.tree.leaves(adapter.lora))  # B moved off zero.
  # The merged export is a Hugging Face checkpoint that transformers loads.
  assert isinstance(transformers.CLIPModel.from_pretrained(os.path.join(workdir, "merged")),
                    transformers.CLIPModel)

  # eval.py: the adapter and the merged checkpoint reproduce train.py's test accuracy.
  eval_cli = load_eval_module()
  config = runlocal.get_config()
  config.progress = False
  with_adapter = eval_cli.evaluate(config, os.path.join(workdir, "adapter.safetensors"), "test",
                                   "auto")
  assert with_adapter["top1"] == pytest.approx(results["test_top1"])
  assert with_adapter["count"] == results["test_count"]
  config.model, config.random_init = os.path.join(workdir, "merged"), False
  merged = eval_cli.evaluate(config, None, "test", "config")
  assert merged["top1"] == pytest.approx(results["test_top1"])


def test_block_lora_trains_through_the_same_command_and_eval_reads_its_adapter(tmp_path):
  workdir = str(tmp_path / "block")
  out = subprocess.run(train_cmd(workdir, "--config.total_steps=10", "--config.lora.split=rank",
                                 "--config.lora.blocks=2", "--config.lora.rank=4",
                                 config_arg=":method=block_lora"),
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  adapter = read_adapter(workdir)
  assert adapter.config == block_lora.BlockLoRAConfig(split="rank", blocks=2, rank=4)
  assert adapter.lora["vision"]["layers_0"]["attn"]["q"]["b"].shape == (2, 2, 64)
  assert results["trainable_parameters"] == lora.num_parameters(adapter.lora)
  config = runlocal.get_config("method=block_lora")
  config.progress = False
  evaluated = load_eval_module().evaluate(config, os.path.join(workdir, "adapter.safetensors"),
                                          "test", "auto")
  assert evaluated["top1"] == pytest.approx(results["test_top1"])


def test_killed_run_resumes_to_the_same_adapter(tmp_path, runlocal_run):
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(train_cmd(killed, *RUNLOCAL_OVERRIDES), env=ENV, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  first_checkpoint = os.path.join(killed, "checkpoints", "10")
  deadline = time.time() + 300
  while not os.path.isdir(first_checkpoint) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not os.path.exists(os.path.join(killed, "results.json"))

  out = subprocess.run(train_cmd(killed, *RUNLOCAL_OVERRIDES), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  # Against the same command uninterrupted (same process set-up, so same XLA flags and programs).
  uninterrupted = runlocal_run[0]
  resumed, reference = read_adapter(killed), read_adapter(uninterrupted)
  for got, want in zip(jax.tree.leaves(resumed.lora), jax.tree.leaves(reference.lora)):
    np.testing.assert_array_equal(got, want)
  assert json.load(open(os.path.join(killed, "results.json")))["test_top1"] == \
      json.load(open(os.path.join(uninterrupted, "results.json")))["test_top1"]


@pytest.mark.parametrize("override,message", [
    ("--config.lora.rnak=2", 'Did you mean "rank"'),
    ("--config.lora.rank=0", "rank must be a positive integer"),
    ("--config.shots=-1", "config.shots=-1"),
    ("--config.lora.matrices=q,x", "lora.matrices"),
    ("--config.method=llu", "start from configs/llu.py"),
    ("--config.method=dora", "config.method='dora': use one of lora, block_lora, llu"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, override, message):
  workdir = str(tmp_path / "run")
  out = subprocess.run(train_cmd(workdir, override), env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2
  assert message in out.stderr and "error:" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
