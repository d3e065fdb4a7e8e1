"""The dataset registry: the protocol's class names, templates and splits; mock-data loading."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clip_lora_jax import data
from clip_lora_jax.data.registry import Carve
from clip_lora_jax.errors import UserError

NUM_CLASSES = {"imagenet": 1000, "sun397": 397, "fgvc_aircraft": 100, "eurosat": 10,
               "stanford_cars": 196, "food101": 101, "oxford_pets": 37, "oxford_flowers": 102,
               "caltech101": 100, "dtd": 47, "ucf101": 101}
COOP_TEMPLATES = {"oxford_pets": "a photo of a {}, a type of pet.",
                  "oxford_flowers": "a photo of a {}, a type of flower.",
                  "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
                  "eurosat": "a centered satellite photo of {}.",
                  "food101": "a photo of {}, a type of food.",
                  "ucf101": "a photo of a person doing {}."}


def test_the_eleven_datasets_are_registered():
  assert data.DATASET_NAMES == tuple(NUM_CLASSES)
  for name, count in NUM_CLASSES.items():
    spec = data.get_dataset(name)
    assert spec.name == name and spec.num_classes == count
    # CLIP's curated ImageNet names have two twins: "missile" and "sunglasses" (its own data).
    assert len(set(spec.class_names)) == count - 2 * (name == "imagenet")
    assert not any("_" in c for c in spec.class_names)  # prompt-ready
    assert spec.template == "a photo of a {}."
    assert spec.coop_template == COOP_TEMPLATES.get(name, "a photo of a {}.")
    if name != "imagenet":
      assert spec.ensemble_templates == (spec.coop_template,)


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(UserError, match="unknown dataset 'cifar10'.*eurosat.*ucf101"):
    data.get_dataset("cifar10")


def test_imagenet_uses_clips_curated_names_and_80_templates():
  spec = data.get_dataset("imagenet")
  assert spec.class_names[:3] == ("tench", "goldfish", "great white shark")
  assert spec.class_names[21] == "kite (bird of prey)"
  assert len(spec.ensemble_templates) == 80 and "a bad photo of a {}." in spec.ensemble_templates
  assert all(t.count("{}") == 1 for t in spec.ensemble_templates)
  assert spec.splits == {"train": ("train",), "test": ("validation",)}


def test_class_names_follow_the_protocol():
  names = {name: data.get_dataset(name).class_names for name in NUM_CLASSES}
  assert names["eurosat"] == (
      "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
      "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
      "River", "Sea or Lake")
  assert "outdoor apartment building" in names["sun397"] and names["sun397"][0] == "abbey"
  assert "2012 Tesla Model S Sedan" in names["stanford_cars"]
  assert names["food101"][0] == "apple pie"
  assert names["oxford_pets"][:2] == ("abyssinian", "american bulldog")
  assert {"lotus lotus", "pink-yellow dahlia"} <= set(names["oxford_flowers"])
  assert names["dtd"][0] == "banded" and "polka-dotted" in names["dtd"]
  assert names["ucf101"][0] == "Apply Eye Makeup" and names["ucf101"][-1] == "Yo Yo"
  assert names["fgvc_aircraft"][:2] == ("707-320", "727-200") and "F/A-18" in names["fgvc_aircraft"]


def test_caltech_drops_background_and_easy_faces_in_coop_label_order():
  spec = data.get_dataset("caltech101")
  tfds_names = tfds.builder("caltech101").info.features["label"].names
  mapped = dict(zip(tfds_names, spec.label_map))
  assert mapped["background_google"] == mapped["faces_easy"] == -1
  # The protocol sorts the original folders, capitalised ones first, then renames four classes.
  assert spec.class_names[:5] == ("face", "leopard", "motorbike", "accordion", "airplane")
  assert spec.class_names[mapped["faces"]] == "face"
  assert spec.class_names[mapped["car_side"]] == "car side"
  assert sorted(v for v in spec.label_map if v >= 0) == list(range(100))


def test_benchmark_splits_follow_the_protocol():
  def splits(name):
    return data.get_dataset(name).splits
  assert splits("eurosat")["test"] == Carve(("train",), (0.5, 0.2, 0.3), 2)
  assert splits("food101")["val"] == Carve(("train", "validation"), (0.5, 0.2, 0.3), 1)
  assert splits("oxford_pets")["val"] == Carve(("train",), (0.8, 0.2), 1)
  assert splits("oxford_pets")["test"] == ("test",)
  assert splits("fgvc_aircraft") == {"train": ("train",), "val": ("validation",), "test": ("test",)}
  assert data.get_dataset("sun397").tfds_name == "sun397/standard-part1-120k"


def test_split_file_paths_match_the_protocol_layout():
  def path(name, *example):
    return data.get_dataset(name).split_file_key(*example)
  assert path("eurosat", "train", "AnnualCrop_1.jpg", "AnnualCrop") == "AnnualCrop/AnnualCrop_1.jpg"
  assert path("caltech101", "test", "image_0001.jpg", "faces") == "Faces/image_0001.jpg"
  assert path("stanford_cars", "test", "00001", "x") == "cars_test/00001.jpg"
  assert path("sun397", "train", "/a/abbey/sun_a.jpg", "/a/abbey") == "a/abbey/sun_a.jpg"
  assert path("dtd", "train", "banded/banded_0002.jpg", "banded") == "banded/banded_0002.jpg"
  assert data.get_dataset("food101").file_key is None  # TFDS keeps no file names


@pytest.mark.parametrize("name", list(NUM_CLASSES))
def test_every_dataset_loads_under_mock_data(name):
  spec = data.get_dataset(name)
  with tfds.testing.mock_data(num_examples=20):
    features = tfds.builder(spec.tfds_name).info.features
    assert features[spec.image_key].shape[-1] == 3 and len(features[spec.image_key].shape) == 3
    assert spec.file_key is None or spec.file_key in features
    assert len(spec.label_map or range(spec.num_classes)) == features[spec.label_key].num_classes
    batch = next(data.eval_batches(spec, "test", batch_size=4, image_size=32))
    if name == "imagenet":  # the reference's draw needs K + min(K, 4) images of every class
      with pytest.raises(UserError, match=r"1000 imagenet classes have fewer than the 4 training"):
        data.load_few_shot(spec, 2, seed=0)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # 20 random examples leave classes short
      few = data.load_few_shot(spec, 2, seed=0, sampler="numpy" if name == "imagenet" else None)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert np.all((batch["label"] >= 0) & (batch["label"] < spec.num_classes))
  assert few.num_classes == spec.num_classes and len(few.images) == len(few.labels)
  assert len(few.images) + len(few.val_images) > 0  # 20 examples spread over the classes
  assert np.all(np.bincount(few.labels) <= 2)
