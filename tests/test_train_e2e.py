"""train.py and eval.py end to end on the runlocal config (tiny random CLIP, mock EuroSAT)."""

import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import transformers

from clip_lora_jax import files, lora, methods
from clip_lora_jax.methods import block_lora
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


def runlocal_config():
  """The config of `runlocal_run`, as train.py resolves it."""
  config = runlocal.get_config()
  config.update_from_flattened_dict({"progress": False, "total_steps": 40, "checkpoint_every": 10,
                                     "eval_every": 20, "export_merged": True})
  return config


def read_bytes(workdir: str, *names: str) -> dict[str, bytes]:
  return {name: open(os.path.join(workdir, name), "rb").read() for name in names}


def metric_rows(workdir: str, key: str) -> list[int]:
  """The steps of the metrics.jsonl rows that hold `key`."""
  return [r["step"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if key in r]


def test_train_writes_adapter_metrics_results_and_eval_agrees(runlocal_run):
  workdir, stdout, stderr = runlocal_run
  assert "test top-1" in stdout
  # Library noise is silenced: what remains on stderr are clip_lora_jax's own warnings.
  assert [line for line in stderr.splitlines() if line.strip() and "clip_lora_jax" not in line
          and not line.lstrip().startswith("warnings.warn(")] == []
  # Files get the permissions the umask gives new files.
  mask = files.umask()
  for name in ("adapter.safetensors", "results.json", "config.json", "merged/model.safetensors"):
    assert stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode) == 0o666 & ~mask, name
  assert stat.S_IMODE(os.stat(os.path.join(workdir, "merged")).st_mode) == 0o777 & ~mask

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
  assert adapter.template == "a photo of a {}."
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
  # The merged model records its prompt template: eval.py's default prompts for it.
  config.model, config.random_init = os.path.join(workdir, "merged"), False
  merged = eval_cli.evaluate(config, None, "test", "auto")
  assert merged["templates"] == ["a photo of a {}."]
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


def wait_for_checkpoint(proc: subprocess.Popen, workdir: str, step: int) -> None:
  """Until `proc` has written the checkpoint of `step` (or ended)."""
  checkpoint = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + 300
  while not os.path.isdir(checkpoint) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)


def test_killed_run_resumes_to_the_same_bytes(tmp_path, runlocal_run):
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(train_cmd(killed, *RUNLOCAL_OVERRIDES), env=ENV, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  wait_for_checkpoint(proc, killed, 10)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not os.path.exists(os.path.join(killed, "results.json"))

  out = subprocess.run(train_cmd(killed, *RUNLOCAL_OVERRIDES), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"resuming from step [1-3]0 of 40", out.stdout)

  # Byte for byte the files of the same command run uninterrupted in another process (safetensors
  # metadata are written sorted), and each metrics row once.
  names = ("adapter.safetensors", "results.json")
  assert read_bytes(killed, *names) == read_bytes(runlocal_run[0], *names)
  assert metric_rows(killed, "train/loss") == list(range(5, 41, 5))
  assert metric_rows(killed, "val/top1") == [20] and metric_rows(killed, "test/top1") == [40]


def test_ctrl_c_stops_in_one_line_saying_how_to_resume(tmp_path):
  workdir = str(tmp_path / "interrupted")
  proc = subprocess.Popen(train_cmd(workdir, *RUNLOCAL_OVERRIDES), env=ENV, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_checkpoint(proc, workdir, 10)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err
  # Resuming is the killed run's (test_killed_run_resumes_to_the_same_bytes).
  assert re.fullmatch(r"error: interrupted at step \d+; run the same command to resume \(from step "
                      r"[1-4]0, .*checkpoints/[1-4]0\)", err.strip().splitlines()[-1])


def test_a_finished_run_again_prints_its_results_and_adds_a_merged_export(tmp_path, runlocal_run):
  workdir = str(tmp_path / "run")
  shutil.copytree(runlocal_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "merged"))
  names = ("adapter.safetensors", "results.json", "metrics.jsonl", "config.json")
  before = read_bytes(workdir, *names)
  out = subprocess.run(train_cmd(workdir, *RUNLOCAL_OVERRIDES), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "holds this run, finished: nothing to train" in out.stdout
  assert "test top-1" in out.stdout
  assert read_bytes(workdir, *names) == before  # no training, no second test row
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == \
      sorted(os.listdir(os.path.join(runlocal_run[0], "checkpoints")))
  merged = "merged/model.safetensors"
  assert read_bytes(workdir, merged) == read_bytes(runlocal_run[0], merged)


def test_a_run_killed_after_its_merged_export_resumes(tmp_path, runlocal_run):
  workdir = str(tmp_path / "run")  # killed after the test row, before results.json
  shutil.copytree(runlocal_run[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  merged_mtime = os.stat(os.path.join(workdir, "merged", "model.safetensors")).st_mtime_ns
  results = methods.train_and_evaluate(runlocal_config(), workdir)  # as train.py calls it
  expected = json.load(open(os.path.join(runlocal_run[0], "results.json")))
  assert results == pytest.approx(expected)
  assert metric_rows(workdir, "test/top1") == [40]  # the test row once
  assert metric_rows(workdir, "train/loss") == list(range(5, 41, 5))
  assert os.stat(os.path.join(workdir, "merged", "model.safetensors")).st_mtime_ns == merged_mtime


def test_a_nonfinite_loss_stops_the_run_naming_the_step(tmp_path):
  workdir = str(tmp_path / "run")
  out = subprocess.run(train_cmd(workdir, "--config.optimizer.learning_rate=1e30"), env=ENV,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert re.fullmatch(r"error: the loss is nan at step \d: training diverged; the last good "
                      r"checkpoint is none: none was saved yet\. Lower "
                      r"config\.optimizer\.learning_rate .*", out.stderr.strip().splitlines()[-1])
  assert not os.path.exists(os.path.join(workdir, "adapter.safetensors"))


def test_help_lists_every_config_key_with_its_default():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--helpfull"], env=ENV,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  for line in ("--config.lora.rank=2 (int)", "--config.optimizer.learning_rate=0.0002 (float)",
               "--config.data_dir=None (str)", "--overwrite"):
    assert line in out.stdout
  out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                        os.path.join(ROOT, "configs/llu.py"), "--helpfull"], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  keys = out.stdout.split("config keys of")[1]
  assert "--config.llu.gamma=0.5 (float)" in keys and "--config.lora." not in keys


def test_command_line_mistakes_are_one_line(tmp_path, runlocal_run):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  broken = tmp_path / "broken_config.py"
  broken.write_text("def get_config(:\n  pass\n")
  eval_cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--config",
              os.path.join(ROOT, "configs/runlocal.py"), "--config.progress=False"]
  adapter = os.path.join(runlocal_run[0], "adapter.safetensors")
  for cmd, message in [
      (train_cmd(str(a_file / "run")), "lies below"),
      ([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(broken), "--workdir",
        str(tmp_path / "run")], "could not load the config file: invalid syntax"),
      # checked before anything is evaluated
      ([*eval_cmd, "--output", str(tmp_path)], "is a directory; give a file path"),
      # explicit layer lists reach the config; the adapter's settings are not overridden
      ([*eval_cmd, "--adapter", adapter, "--config.lora.rank=4", "--config.lora.layers=0,1"],
       "lora.layers=(0, 1) (the adapter's is 'all'); lora.rank=4 (the adapter's is 2)"),
  ]:
    out = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert message in out.stderr and out.stderr.startswith("error: "), out.stderr[-3000:]
  assert not os.path.exists(tmp_path / "run")


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
