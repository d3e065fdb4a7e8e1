"""Every feature-cache and prompt-learning method of the registry through train.py's entry point
and eval.py, on the runlocal config (tiny random CLIP, mock EuroSAT): trains or solves, writes
an adapter file that eval.py scores exactly as the run did, and round-trips. The LoRA family and LLU have their own
end-to-end tests (tests/test_train_e2e.py, tests/test_llu_run.py)."""

import json
import os

import numpy as np
import pytest

from clip_lora_jax import base as base_lib
from clip_lora_jax import inference, methods
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, prompt_learning
from configs import runlocal
from tests.test_train_e2e import load_eval_module

FEATURE_METHODS = [name for name in methods.METHODS
                   if getattr(methods.get(name), "train_and_evaluate", None) is feature_cache.run]
PROMPT_METHODS = [name for name in methods.METHODS
                  if getattr(methods.get(name), "train_and_evaluate", None) is prompt_learning.run]


@pytest.fixture(scope="module")
def feature_cache_dir(tmp_path_factory):
  """One feature cache for every method: the features are computed by the first run only."""
  return str(tmp_path_factory.mktemp("cache"))


def config_for(name, cache_dir):
  config = runlocal.get_config(f"method={name}")
  config.progress = False
  config.cache_dir = cache_dir
  return config


def test_the_registry_has_the_feature_and_prompt_methods():
  assert "zero_shot" in FEATURE_METHODS and "coop" in PROMPT_METHODS


@pytest.mark.parametrize("name", FEATURE_METHODS + PROMPT_METHODS)
def test_method_trains_and_eval_py_scores_its_adapter(tmp_path, feature_cache_dir, name):
  config = config_for(name, feature_cache_dir)
  workdir = str(tmp_path / name)
  results = methods.train_and_evaluate(config, workdir)  # as train.py calls it
  assert results["method"] == name and results["dataset"] == "eurosat"
  path = os.path.join(workdir, "adapter.safetensors")
  adapter = methods.load_adapter(path)
  assert adapter.method == name
  assert adapter.few_shot == {"dataset": "eurosat", "shots": 2, "seed": 1, "sampler": "numpy"}
  assert results["trainable_parameters"] == feature_cache.num_parameters(adapter.params)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("test/top1" in r for r in records)

  evaluated = load_eval_module().evaluate(config_for(name, feature_cache_dir), path, "test", "auto")
  assert evaluated["top1"] == pytest.approx(results["test_top1"])
  assert evaluated["count"] == results["test_count"]

  if name in PROMPT_METHODS:  # learned prompts serve any class names (predict.py's classes)
    base = base_lib.load_base_model(config.model, config.random_init, config.seed)
    assert inference.fixed_class_count(base, adapter) is None
    if name == "cocoop":  # the one whose class embeddings depend on the image
      images = np.zeros((2, 32, 32, 3), np.float32)
      assert methods.logits_fn(base, adapter, ["cat", "dog", "bird"], ())(images).shape == (2, 3)

  feature_cache.save_adapter(str(tmp_path / "again.safetensors"), adapter)
  assert open(tmp_path / "again.safetensors", "rb").read() == open(path, "rb").read()

  # A finished run is not trained again.
  assert methods.train_and_evaluate(config_for(name, feature_cache_dir), workdir) == results


def test_unknown_method_and_bad_values_are_refused_before_anything_is_written(tmp_path,
                                                                              feature_cache_dir):
  config = config_for("zero_shot", feature_cache_dir)
  config.method = "tip_adaptor"
  with pytest.raises(UserError, match="config.method='tip_adaptor': use one of .*zero_shot"):
    methods.train_and_evaluate(config, str(tmp_path / "a"))
  config = config_for("zero_shot", feature_cache_dir)
  config.templates = "fancy"
  with pytest.raises(UserError, match="templates='fancy': use one of config, coop"):
    methods.train_and_evaluate(config, str(tmp_path / "b"))
  config = config_for("zero_shot", feature_cache_dir)
  config.views = 0
  with pytest.raises(UserError, match="config.views=0: must be a positive integer"):
    methods.train_and_evaluate(config, str(tmp_path / "c"))
  config = config_for("zero_shot", feature_cache_dir)
  config.export_merged = True
  with pytest.raises(UserError, match="does not change the weights"):
    methods.train_and_evaluate(config, str(tmp_path / "d"))
  assert not os.listdir(tmp_path)


def test_a_feature_cache_of_another_base_or_task_is_refused(tmp_path, feature_cache_dir):
  config = config_for("zero_shot", str(tmp_path / "cache"))
  methods.train_and_evaluate(config, str(tmp_path / "run"))
  (cached,) = os.listdir(tmp_path / "cache" / "features")
  path = tmp_path / "cache" / "features" / cached
  with np.load(path) as f:
    contents = dict(f)
  contents["key"] = np.asarray("0" * 64)  # another base's or task's features under this name
  np.savez(path, **contents)
  with pytest.raises(UserError, match="holds the features of another base model or task"):
    methods.train_and_evaluate(config, str(tmp_path / "other"))


def test_the_feature_methods_benchmark_runs_every_method(tmp_path):
  from benchmarks import feature_methods  # pylint: disable=import-outside-toplevel
  tasks = {"embedding": feature_methods.synthetic_task(4, 2, 2, 8),
           "features": feature_methods.synthetic_task(4, 2, 2, 8, width=12)}
  for name in FEATURE_METHODS:
    row = feature_methods.time_method(name, tasks, 2, 2, str(tmp_path / name))
    assert row["method"] == name and row["seconds"] > 0 and 0 <= row["val_top1"] <= 100
    assert row["views"] == min(row["recipe_views"], 2)
  one_view = feature_methods.first_views(tasks["embedding"], 1)
  assert len(one_view.views) == len(one_view.shots)
  assert sorted(one_view.view_shots) == list(range(len(one_view.shots)))  # each shot once
