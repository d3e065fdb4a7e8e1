"""A workdir belongs to one run (clip_lora_jax.workdirs): refusals before anything is written,
finished runs, overwrite, and the metrics rows of a resumed run."""

import json
import os

import pytest

from clip_lora_jax import files, metrics, methods, training, workdirs
from clip_lora_jax.errors import UserError
from configs import runlocal


def config():
  c = runlocal.get_config()
  c.progress = False
  return c


def recorded(tmp_path, c) -> str:
  """A workdir that records the run of config `c`, as a run records it (resolved)."""
  workdir = str(tmp_path / "run")
  training.resolve(c)
  workdirs.record(c, workdir)
  return workdir


@pytest.mark.parametrize("key,value,message", [
    ("dataset", "dtd", 'dataset "eurosat" there, "dtd" here'),
    ("seed", 2, "seed 1 there, 2 here"),
    ("lora.rank", 4, "lora.rank 2 there, 4 here"),
    ("total_steps", 30, "total_steps 40 there, 30 here"),
    ("optimizer.learning_rate", 1e-3, "optimizer.learning_rate 0.0002 there, 0.001 here"),
    ("batch_size", 16, "batch_size 8 there, 16 here"),
])
def test_a_workdir_of_another_run_is_refused_naming_each_key(tmp_path, key, value, message):
  c = config()
  workdir = recorded(tmp_path, c)
  before = open(os.path.join(workdir, "config.json")).read()
  c.update_from_flattened_dict({key: value})
  with pytest.raises(UserError, match=r"holds another run \(.*" + message.replace(".", r"\.")
                     + r".*\); use another --workdir, or --overwrite to replace that run"):
    methods.train_and_evaluate(c, workdir)  # refused before any model loads
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_another_method_is_another_run(tmp_path):
  workdir = recorded(tmp_path, config())
  with pytest.raises(UserError, match=r'lora.blocks absent there, 8 here; .*method "lora" there, '
                                      r'"block_lora" here'):
    workdirs.check(runlocal.get_config("method=block_lora"), workdir)


def test_keys_that_do_not_change_the_results_may_differ(tmp_path):
  c = config()
  workdir = recorded(tmp_path, c)
  for key, value in [("progress", True), ("eval_every", 7), ("log_every", 1),
                     ("checkpoint_every", 3), ("keep_checkpoints", 1), ("export_merged", True),
                     ("cache_dir", "/elsewhere")]:
    c[key] = value
  workdirs.check(c, workdir)
  assert workdirs.finished_results(c, workdir) is None  # not finished: no results.json


@pytest.mark.parametrize("key,value,message,loads_model", [
    ("dataset", "eurost", "unknown dataset 'eurost'", False),
    ("seed", -1, "config.seed=-1", False),
    ("optimizer.learning_rate", 0.0, "learning_rate=0.0", False),
    ("data_dir", "/nonexistent/tfds", "data_dir='/nonexistent/tfds' is not a directory", False),
    ("lora.layers", "0,5", r"lora.layers=\(0, 5\): indices must be in \[0, 1\]", True),
    ("lora.layers", "mid", "defined for 12-layer towers only", True),
])
def test_a_run_no_model_can_train_is_refused_before_the_workdir_is_written(
    tmp_path, monkeypatch, key, value, message, loads_model):
  if not loads_model:  # refused before the (slow, for real models) base model loads
    monkeypatch.setattr(training.base_lib, "load_base_model", None)
  c = config()
  c.update_from_flattened_dict({key: value})
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match=message):
    methods.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()


def test_a_finished_run_is_not_trained_again(tmp_path):
  c = config()
  workdir = recorded(tmp_path, c)
  results = {"method": "lora", "test_top1": 12.5}
  files.write_json(os.path.join(workdir, "results.json"), results)
  assert methods.train_and_evaluate(c, workdir) == results  # no model, no data: the record


def test_workdir_paths_and_leftovers_are_checked(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  c = config()
  with pytest.raises(UserError, match="is a file; give a directory path"):
    workdirs.check(c, str(a_file))
  with pytest.raises(UserError, match="lies below .*a_file', which is a file"):
    workdirs.check(c, str(a_file / "run" / "deeper"))
  leftovers = tmp_path / "leftovers"
  (leftovers / "checkpoints").mkdir(parents=True)
  with pytest.raises(UserError, match="holds checkpoints but no config.json"):
    workdirs.check(c, str(leftovers))
  (leftovers / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="cannot be read"):
    workdirs.check(c, str(leftovers))
  workdirs.check(c, str(leftovers), overwrite=True)


def test_overwrite_replaces_the_run_files_only(tmp_path):
  workdir = recorded(tmp_path, config())
  for name in ("metrics.jsonl", "adapter.safetensors", "results.json", "notes.txt"):
    open(os.path.join(workdir, name), "w").close()
  os.makedirs(os.path.join(workdir, "checkpoints", "10"))
  other = config()
  other.dataset = "dtd"
  workdirs.check(other, workdir, overwrite=True)
  workdirs.record(other, workdir, overwrite=True)
  assert sorted(os.listdir(workdir)) == ["config.json", "notes.txt"]
  workdirs.check(other, workdir)


def test_a_resumed_run_drops_the_rows_it_writes_again(tmp_path):
  rows = [{"step": 5, "train/loss": 1.0}, {"step": 10, "train/loss": 0.9},
          {"step": 10, "val/top1": 50.0}, {"step": 15, "train/loss": 0.8},
          {"step": 20, "test/top1": 40.0}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 20, "tra')
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.resume_at(10)
    writer.write(11, {"train/loss": 0.7})
  got = [json.loads(line) for line in path.read_text().splitlines()]
  assert [{k: v for k, v in r.items() if k != "time"} for r in got] == [
      *rows[:3], {"step": 11, "train/loss": 0.7}]
