"""Base-to-novel class halves and the 200-class ImageNet-A / -R test sets against their rules,
on the registry and on mock data with known labels."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from clip_lora_jax.data import registry, source, splits
from clip_lora_jax.sweep import protocols
from tests.test_train_e2e import load_eval_module


@pytest.mark.parametrize("n", [10, 47, 1, 2])
def test_base_novel_halves_follow_the_rule(n):
  halves = registry.base_novel_ids(n)
  assert halves["base"] == tuple(range(math.ceil(n / 2)))
  assert halves["novel"] == tuple(range(math.ceil(n / 2), n))


@pytest.mark.parametrize("name,base,novel", [("dtd", 24, 23), ("eurosat", 5, 5)])
def test_class_halves_relabel_from_zero_on_mock_data(name, base, novel):
  full = registry.get_dataset(name)
  halves = {part: registry.get_dataset(f"{name}/{part}") for part in registry.CLASS_SPLITS}
  assert (halves["base"].num_classes, halves["novel"].num_classes) == (base, novel)
  assert halves["base"].class_names + halves["novel"].class_names == full.class_names
  with tfds.testing.mock_data(num_examples=60):
    test = splits.benchmark_split(full, "test")
    for part, spec in halves.items():
      offset = 0 if part == "base" else base
      examples = splits.benchmark_split(spec, "test")
      inside = (test.label >= offset) & (test.label < offset + spec.num_classes)
      assert np.array_equal(examples.index, test.index[inside])
      assert np.array_equal(examples.label, test.label[inside] - offset)


def test_unknown_class_half_is_refused():
  with pytest.raises(Exception, match="unknown dataset 'dtd/middle'.*NAME/base"):
    registry.get_dataset("dtd/middle")


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_are_200_way_in_sorted_wnid_order(name):
  spec = registry.get_dataset(name)
  imagenet = registry.get_dataset("imagenet")
  wnids = tfds.builder("imagenet2012").info.features["label"].names
  ours = json.loads(registry._asset("imagenet_subsets.json"))[name]
  assert spec.num_classes == 200 and ours == sorted(ours)
  assert [wnids[i] for i in spec.subset_of.ids] == ours
  assert spec.class_names == tuple(imagenet.class_names[wnids.index(w)] for w in ours)
  # Mock TFDS examples carry ImageNet-1k labels: those of the 200 classes are kept, relabelled.
  with tfds.testing.mock_data(num_examples=300):
    raw = source.catalog(spec, source.builder(spec, None), "test", None).labels
    test = splits.benchmark_split(spec, "test")
  kept = np.flatnonzero(np.isin(raw, spec.subset_of.ids))
  assert len(kept) and np.array_equal(test.index, kept)
  assert [spec.class_names[label] for label in test.label] == \
      [imagenet.class_names[label] for label in raw[kept]]


def test_a_head_over_imagenet_scores_imagenet_r_through_its_200_columns(monkeypatch):
  """A class-specific head trained on ImageNet (1000 outputs) scored on ImageNet-R: column j of
  the scores is the head's column for R's class j."""
  eval_cli = load_eval_module()
  spec = registry.get_dataset("imagenet_r")
  seen = {}

  def logits_fn(base, adapter, class_names, templates):
    seen["names"] = class_names
    return lambda images: jnp.tile(jnp.arange(1000.0), (len(images), 1))

  monkeypatch.setattr(eval_cli.methods, "logits_fn", logits_fn)
  adapter = type("Adapter", (), {"few_shot": {"dataset": "imagenet"}})()
  scores = eval_cli.adapter_logits_fn(spec, None, adapter, ("{}",))(jnp.zeros((2, 4, 4, 3)))
  assert seen["names"] == registry.get_dataset("imagenet").class_names
  assert scores.shape == (2, 200)
  assert np.array_equal(np.asarray(scores[0]), np.asarray(spec.subset_of.ids, np.float32))
  # An adapter of another dataset is given the 200 names themselves.
  adapter.few_shot = {"dataset": "dtd"}
  eval_cli.adapter_logits_fn(spec, None, adapter, ("{}",))
  assert seen["names"] == spec.class_names


def test_protocol_grids_and_applicability(monkeypatch):
  monkeypatch.setattr(protocols, "class_specific", lambda method: method == "head")
  cells = protocols.grid("base_to_novel", ["lora"], ["dtd"], [16], [1, 2])
  assert [c.key for c in cells] == [
      "lora/dtd-base/16shot_seed1", "lora/dtd-base/16shot_seed2",
      "lora/dtd-base/16shot_seed1/on_dtd-novel", "lora/dtd-base/16shot_seed2/on_dtd-novel"]
  cross = protocols.grid("cross_dataset", ["head"], ["imagenet", "dtd", "eurosat"], [16], [1])
  assert [c.target for c in cross] == [None, "dtd", "eurosat"]
  assert protocols.scoring(cross[1]) is None  # a head cannot score DTD's classes
  shift = protocols.grid("domain_shift", ["head", "lora", "zero_shot"], [], [16], [1])
  assert {(c.method, protocols.scoring(c)) for c in shift if c.target == "imagenet_a"} == {
      ("head", protocols.ADAPTER), ("lora", protocols.ADAPTER), ("zero_shot", protocols.PLAIN)}
  assert protocols.scoring(cells[2]) == protocols.ADAPTER
