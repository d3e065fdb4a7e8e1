"""LLU through the shared pipeline: methods dispatch, feature cache, resuming, adapter files,
eval.py."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from clip_lora_jax import data, features, methods, model, sharding, training
from clip_lora_jax.methods import feature_cache, llu
from clip_lora_jax.errors import UserError
from configs import runlocal
from tests.test_train_e2e import load_eval_module


def config_for(tmp_path, **overrides):
  config = runlocal.get_config("method=llu")
  config.progress = False
  config.cache_dir = str(tmp_path / "cache")
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def test_llu_trains_resumes_and_eval_py_reads_its_adapter(tmp_path):
  config = config_for(tmp_path, eval_every=20, checkpoint_every=20)
  whole = str(tmp_path / "whole")
  results = methods.train_and_evaluate(config, whole)  # as train.py calls it
  assert results["method"] == "llu" and results["steps"] == 40
  assert results["trainable_parameters"] == 2 * (32 * 32 + 32)  # W and b of both modalities
  records = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
  assert [r["step"] for r in records if "val/top1" in r] == [20]
  assert [r["step"] for r in records if "train/loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]

  adapter = methods.load_adapter(os.path.join(whole, "adapter.safetensors"))
  assert isinstance(adapter, llu.Adapter) and adapter.config == llu.LLUConfig()
  assert adapter.few_shot == {"dataset": "eurosat", "shots": 2, "seed": 1, "sampler": "numpy"}
  assert np.abs(adapter.params["image"]["w"] - np.eye(32)).max() > 1e-3  # it trained
  assert set(adapter.anchors) == {"image", "text"} and adapter.anchors["text"].shape == (10, 32)
  evaluated = load_eval_module().evaluate(config, os.path.join(whole, "adapter.safetensors"),
                                          "test", "auto")
  assert evaluated["top1"] == pytest.approx(results["test_top1"])
  assert evaluated["count"] == results["test_count"]

  resumed = str(tmp_path / "resumed")  # as if killed after the step-20 checkpoint
  shutil.copytree(os.path.join(whole, "checkpoints", "20"),
                  os.path.join(resumed, "checkpoints", "20"))
  shutil.copy(os.path.join(whole, "config.json"), resumed)
  assert llu.train_and_evaluate(config, resumed) == results
  again = llu.load_adapter(os.path.join(resumed, "adapter.safetensors"))
  for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(adapter.params)):
    np.testing.assert_array_equal(x, y)
  assert len(os.listdir(tmp_path / "cache" / "features")) == 1  # computed once, then reused

  # The adapter fixes its settings: command-line overrides contradicting it are refused.
  assert adapter.template == config.template
  methods.check_overrides(adapter, config, ["llu.gamma"])  # 0.5, the adapter's own
  config.llu.gamma, config.lora = 0.3, runlocal.get_config().lora
  with pytest.raises(UserError, match=r"llu.gamma=0.3 \(the adapter's is 0.5\); lora.rank \(not "
                                      r"a setting of a 'llu' adapter\)"):
    methods.check_overrides(adapter, config, ["llu.gamma", "lora.rank"])
  # A finished LLU run has no merged model to add.
  config.llu.gamma, config.export_merged = 0.5, True
  del config.lora
  with pytest.raises(UserError, match="does not change the weights"):
    methods.train_and_evaluate(config, whole)


def test_view_features_are_the_first_epochs_of_the_train_stream(tmp_path):
  base_config = model.get_config("tiny")
  params = model.init_params(jax.random.key(0), base_config)
  with training.data_context(runlocal.get_config()):
    few = data.load_few_shot(data.get_dataset("eurosat"), 2, 1, cache_dir=str(tmp_path))
  mesh = sharding.make_mesh()
  feats = features.few_shot_features(params, base_config, "fp", few, 3, seed=1, batch_size=8,
                                     mesh=mesh, cache_dir=str(tmp_path))
  n = len(few.images)
  assert feats["views"].shape == (3 * n, 32) and feats["shots"].shape == (n, 32)
  np.testing.assert_array_equal(np.sort(feats["view_labels"]), np.sort(np.tile(few.labels, 3)))
  np.testing.assert_array_equal(feats["shot_labels"], few.labels)
  first = next(data.train_batches(few, batch_size=8, image_size=32, seed=1))
  np.testing.assert_allclose(feats["views"][:8],
                             model.encode_images(params, first["image"], base_config), atol=1e-5)
  again = features.few_shot_features(params, base_config, "fp", few, 3, seed=1, batch_size=8,
                                     mesh=mesh, cache_dir=str(tmp_path))
  for key in feats:
    np.testing.assert_array_equal(feats[key], again[key])


def test_batch_indices_visit_every_row_once_per_epoch():
  rows = np.concatenate([feature_cache.batch_indices(10, 4, seed=3, step=s) for s in range(5)])
  assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
  assert list(rows[:10]) != list(range(10))  # shuffled
  np.testing.assert_array_equal(feature_cache.batch_indices(10, 4, 3, 2), rows[8:12])
  np.testing.assert_array_equal(feature_cache.batch_indices(10, 16, 3, 7), np.arange(10))


def test_other_files_are_clear_errors(tmp_path):
  bogus = tmp_path / "bogus.safetensors"
  bogus.write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match="not a readable safetensors"):
    methods.load_adapter(str(bogus))
  with pytest.raises(UserError, match="does not exist"):
    llu.load_adapter(str(tmp_path / "missing.safetensors"))
