"""Splits, few-shot sampling, caching and eval coverage on a small real TFDS dataset on disk.

`tfds.testing.mock_data` ignores splits and slicing, so this file prepares a tiny TFDS dataset
whose every image is a solid colour encoding its example id: any image read back, in a few-shot
set or an eval batch, tells exactly which example it is. The reference sampler is checked against
an independent implementation of the reference code's draw (`tests/reference_sampling.py`), on
split files of several shapes and on an ImageNet-like folder.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clip_lora_jax import data, files
from clip_lora_jax.data import sampling, source, splits
from clip_lora_jax.data.registry import IMAGE_FOLDER, Carve, DatasetSpec
from clip_lora_jax.errors import UserError
from tests import reference_sampling

CLASSES = ("zero", "one", "two", "three", "four")
TRAIN_COUNTS = (12, 10, 9, 8, 3)  # class "four" is short
WIDE_TRAIN_COUNTS = (40, 3, 25, 17, 2)  # config `wide`: enough for 16 shots, and short classes
TEST_COUNTS = (3, 4, 5, 2, 3)  # 17 examples
TEST_ID_BASE = 1000
CORRUPT_ID = 5


def toy_examples(split: str, config: str = "clean") -> list[tuple[int, int, str]]:
  """(example id, label, file name) of a toy split; ids are unique across splits."""
  train_counts = WIDE_TRAIN_COUNTS if config == "wide" else TRAIN_COUNTS
  counts, base = (train_counts, 0) if split == "train" else (TEST_COUNTS, TEST_ID_BASE)
  examples = []
  for label, count in enumerate(counts):
    for _ in range(count):
      example_id = base + len(examples)
      examples.append((example_id, label, f"{CLASSES[label]}/img_{example_id:04d}.png"))
  return examples


def toy_png(example_id: int) -> bytes:
  pixels = np.zeros((8, 8, 3), np.uint8)
  pixels[..., 0], pixels[..., 1], pixels[..., 2] = example_id % 256, example_id // 256, 77
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def toy_info(builder: tfds.core.DatasetBuilder, class_names: tuple[str, ...]
             ) -> tfds.core.DatasetInfo:
  """The features of the test builders: a PNG image, its label and its file name."""
  return tfds.core.DatasetInfo(builder=builder, features=tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      "label": tfds.features.ClassLabel(names=class_names),
      "file_name": tfds.features.Text(),
  }))


class ClipLoraJaxToy(tfds.core.GeneratorBasedBuilder):
  """5 classes, splits train (42) and test (17); config `corrupt` damages train image 5, config
  `wide` has 87 train images (`WIDE_TRAIN_COUNTS`)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="clean"),
                     tfds.core.BuilderConfig(name="corrupt"),
                     tfds.core.BuilderConfig(name="wide")]

  def _info(self):
    return toy_info(self, CLASSES)

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    corrupt = self.builder_config.name == "corrupt"
    for example_id, label, file_name in toy_examples(split, self.builder_config.name):
      image = b"not an image" if corrupt and example_id == CORRUPT_ID else toy_png(example_id)
      yield file_name, {"image": image, "label": label, "file_name": file_name}


def toy_spec(config: str = "clean", **overrides) -> DatasetSpec:
  """The toy dataset as a benchmark: train carved 75/25 into train / val, TFDS test as test."""
  fields = dict(name="toy", tfds_name=f"clip_lora_jax_toy/{config}", class_names=CLASSES,
                splits={"train": Carve(("train",), (0.75, 0.25), 0),
                        "val": Carve(("train",), (0.75, 0.25), 1), "test": ("test",)},
                file_key="file_name")
  return DatasetSpec(**{**fields, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the toy configs prepared, in 3 shards per split."""
  directory = str(tmp_path_factory.mktemp("tfds"))
  for config in ("clean", "corrupt", "wide"):
    tfds.builder(f"clip_lora_jax_toy/{config}", data_dir=directory).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=3))
  return directory


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> str:
  directory = str(tmp_path / "cache")
  monkeypatch.setenv(files.CACHE_ENV, directory)
  return directory


def image_id(encoded: bytes) -> int:
  pixel = np.asarray(Image.open(io.BytesIO(encoded)))[0, 0]
  return int(pixel[0]) + 256 * int(pixel[1])


def eval_ids(batch: dict) -> np.ndarray:
  """Example ids of an eval batch's images (solid colours survive resizing and cropping)."""
  pixels = (batch["image"][:, 4, 4] * np.asarray(data.CLIP_STD) + np.asarray(data.CLIP_MEAN)) * 255
  return np.round(pixels[:, 0] + 256 * pixels[:, 1]).astype(int)


def label_of(example_id: int) -> int:
  split = "test" if example_id >= TEST_ID_BASE else "train"
  return {i: label for i, label, _ in toy_examples(split)}[example_id]


def few_shot(spec, shots, seed, data_dir, **kwargs) -> data.FewShotSet:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # class "four" is short on purpose
    return data.load_few_shot(spec, shots, seed, data_dir=data_dir, **kwargs)


def test_catalog_follows_tfds_canonical_order_across_shards(data_dir):
  spec = toy_spec()
  builder = source.builder(spec, data_dir)
  assert builder.info.splits["train"].num_shards == 3
  catalog = source.catalog(spec, builder, "train", None)
  expected = {file_name: label for _, label, file_name in toy_examples("train")}
  names = [n.decode() for n in catalog.file_names]
  assert sorted(names) == sorted(expected)
  assert list(catalog.labels) == [expected[n] for n in names]
  # Reading examples by index gives the catalogued ones.
  indices = np.array([0, 7, 20, 41])
  read = list(source.selected(spec, builder, "train", indices).as_numpy_iterator())
  assert [int(i) for i, _ in read] == list(indices)
  for (_, encoded), index in zip(read, indices):
    assert f"img_{image_id(encoded):04d}" in names[index]


def test_carved_splits_are_disjoint_cover_train_and_keep_proportions(data_dir):
  spec = toy_spec()
  train = splits.benchmark_split(spec, "train", data_dir)
  val = splits.benchmark_split(spec, "val", data_dir)
  assert not set(train.index) & set(val.index)
  assert sorted([*train.index, *val.index]) == list(range(sum(TRAIN_COUNTS)))
  for label, count in enumerate(TRAIN_COUNTS):
    assert np.sum(train.label == label) == round(count * 0.75)
  again = splits.benchmark_split(spec, "train", data_dir)
  np.testing.assert_array_equal(train.index, again.index)
  assert data.num_examples(spec, "test", data_dir=data_dir) == sum(TEST_COUNTS)


def test_carve_is_coop_rounding_per_class():
  labels = np.repeat([0, 1, 2], [3000, 2500, 7])
  parts = [splits.carve(labels, (0.5, 0.2, 0.3), part) for part in range(3)]
  counts = [[int(np.sum(labels[p] == c)) for c in range(3)] for p in parts]
  assert counts == [[1500, 1250, 4], [600, 500, 1], [900, 750, 2]]
  assert sorted(np.concatenate(parts)) == list(range(len(labels)))


def test_few_shot_has_exactly_k_per_class_and_disjoint_validation(data_dir):
  spec = toy_spec()
  with pytest.warns(UserWarning) as caught:
    few = data.load_few_shot(spec, 4, seed=1, data_dir=data_dir)
  warned = " ".join(str(w.message) for w in caught)
  assert "fewer than 4 train examples" in warned and "four (2)" in warned  # 2 of its 3 carved
  assert few.num_classes == 5 and few.labels.dtype == np.int32
  assert np.bincount(few.labels).tolist() == [4] * 5
  # min(K, 4) validation shots per class, filled up with replacement as well (val holds 1-3).
  assert np.bincount(few.val_labels).tolist() == [4] * 5
  ids = [image_id(image) for image in few.images]
  val_ids = [image_id(image) for image in few.val_images]
  assert [label_of(i) for i in ids] == few.labels.tolist()
  assert [label_of(i) for i in val_ids] == few.val_labels.tolist()
  full = few.labels < 4
  assert len(set(np.asarray(ids)[full])) == full.sum()  # no duplicates without a shortage
  assert not set(ids) & set(val_ids)
  val_split = splits.benchmark_split(spec, "val", data_dir)
  val_names = {n.decode() for n in val_split.file_name}
  assert all(f"img_{i:04d}" in " ".join(val_names) for i in val_ids)


def test_few_shot_is_deterministic_in_the_seed_and_cached(data_dir, cache_dir, monkeypatch):
  spec = toy_spec()
  first = few_shot(spec, 2, 7, data_dir)
  assert any(name.endswith(".npz") for _, _, files in os.walk(cache_dir) for name in files)
  other = few_shot(spec, 2, 8, data_dir)
  assert first.images != other.images

  def no_reading(*args):
    raise AssertionError("a cached few-shot set must not read TFDS")
  monkeypatch.setattr(source, "selected", no_reading)
  cached = few_shot(spec, 2, 7, data_dir)
  assert cached.images == first.images
  np.testing.assert_array_equal(cached.labels, first.labels)
  np.testing.assert_array_equal(cached.val_labels, first.val_labels)


def test_without_a_val_split_validation_shots_come_from_train_and_are_excluded(data_dir):
  spec = toy_spec(splits={"train": ("train",), "test": ("test",)})  # like ImageNet
  few = few_shot(spec, 8, 0, data_dir)
  ids = {image_id(image) for image in few.images}
  val_ids = {image_id(image) for image in few.val_images}
  assert not ids & val_ids and all(i < TEST_ID_BASE for i in ids | val_ids)
  # Class "two" has 9 images: 4 go to validation, the 5 left fill 8 shots with replacement.
  two = [image_id(image) for image, label in zip(few.images, few.labels) if label == 2]
  assert len(two) == 8 and len(set(two)) == 5


@pytest.mark.parametrize("batch_size", [5, 17, 32])
def test_eval_visits_every_test_example_once_and_masks_padding(data_dir, batch_size):
  spec = toy_spec()
  batches = list(data.eval_batches(spec, "test", batch_size=batch_size, image_size=8,
                                   data_dir=data_dir))
  assert len(batches) == -(-sum(TEST_COUNTS) // batch_size)
  images = np.concatenate([b["image"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.shape[1:] == (8, 8, 3) and all(b["label"].shape == (batch_size,) for b in batches)
  ids = eval_ids({"image": images[mask == 1]})
  assert sorted(ids) == [i for i, _, _ in toy_examples("test")]
  assert labels[mask == 1].tolist() == [label_of(i) for i in ids]
  assert mask.sum() == sum(TEST_COUNTS) and not np.any(images[mask == 0])


def test_eval_shards_over_processes_cover_the_split_once(data_dir):
  spec = toy_spec()
  per_process = [list(data.eval_batches(spec, "test", batch_size=6, image_size=8,
                                        data_dir=data_dir, process_index=i, process_count=2))
                 for i in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 3  # ceil(ceil(17 / 2) / 3)
  ids = []
  for batches in per_process:
    for batch in batches:
      assert batch["image"].shape[0] == 3
      ids.extend(eval_ids(batch)[batch["mask"] == 1])
  assert sorted(ids) == [i for i, _, _ in toy_examples("test")]


def write_split_file(path, entries: dict[str, list[tuple[str, int]]]) -> str:
  content = {role: [[p, label, CLASSES[label]] for p, label in items]
             for role, items in entries.items()}
  with open(path, "w") as f:
    json.dump(content, f)
  return str(path)


def test_split_file_maps_file_names_onto_the_exact_split(data_dir, tmp_path):
  train = toy_examples("train")
  chosen = {"train": [(name, label) for _, label, name in train[:20]],
            "val": [(name, label) for _, label, name in train[20:30]],
            "test": [(name, label) for _, label, name in toy_examples("test")[:6]]}
  split_file = write_split_file(tmp_path / "split_zhou_Toy.json", chosen)
  spec = toy_spec()
  for role, items in chosen.items():
    examples = splits.benchmark_split(spec, role, data_dir, split_file)
    assert sorted(n.decode() for n in examples.file_name) == sorted(n for n, _ in items)
  assert data.num_examples(spec, "test", data_dir=data_dir, split_file=split_file) == 6
  few = few_shot(spec, 1, 0, data_dir, split_file=split_file)
  allowed = {int(n[-8:-4]) for n, _ in chosen["train"]}
  assert {image_id(image) for image in few.images} <= allowed
  ids = np.concatenate([eval_ids(b)[b["mask"] == 1] for b in data.eval_batches(
      spec, "test", batch_size=4, image_size=8, data_dir=data_dir, split_file=split_file)])
  assert sorted(ids) == [i for i, _, _ in toy_examples("test")[:6]]


def test_split_file_with_wrong_labels_or_missing_images_is_refused(data_dir, tmp_path,
                                                                   monkeypatch):
  spec = toy_spec()
  name, label = toy_examples("train")[0][2], toy_examples("train")[0][1]
  wrong = write_split_file(tmp_path / "wrong.json",
                           {"train": [(name, label + 1)], "val": [], "test": []})
  with pytest.raises(UserError, match="label"):
    splits.benchmark_split(spec, "train", data_dir, wrong)
  missing = write_split_file(tmp_path / "missing.json", {
      "train": [(name, label), ("zero/not_there.png", 0)], "val": [], "test": []})
  with pytest.raises(UserError, match="1 of the 2 train images"):
    splits.benchmark_split(spec, "train", data_dir, missing)
  monkeypatch.setattr(splits, "MAX_MISSING", 0.5)
  with pytest.warns(UserWarning, match="not_there"):
    assert len(splits.benchmark_split(spec, "train", data_dir, missing)) == 1
  not_a_split_file = tmp_path / "bad.json"
  not_a_split_file.write_text(json.dumps({"train": [["a", 0]]}))
  with pytest.raises(UserError, match="not a CoOp split file"):
    splits.benchmark_split(spec, "train", data_dir, str(not_a_split_file))


def test_split_file_needs_file_names_in_tfds(data_dir, tmp_path):
  split_file = write_split_file(tmp_path / "s.json", {"train": [], "val": [], "test": []})
  with pytest.raises(UserError, match="keeps no file names"):
    splits.benchmark_split(toy_spec(file_key=None), "train", data_dir, split_file)
  with pytest.raises(UserError, match="keeps no file names"):  # the reference sampler's default
    sampling.choose(toy_spec(file_key=None), 1, 0, data_dir, split_file)


def test_unprepared_dataset_says_which_command_to_run(tmp_path):
  empty = str(tmp_path / "empty")
  with pytest.raises(UserError, match=r"python -m clip_lora_jax.data prepare toy --data_dir "):
    data.load_few_shot(toy_spec(), 1, 0, data_dir=empty)
  manual = toy_spec(manual_download="toy.tar")
  with pytest.raises(UserError, match=r"(?s)put toy.tar into .*downloads/manual.*--manual_dir"):
    data.num_examples(manual, "test", data_dir=empty)


def test_unknown_split_is_a_user_error(data_dir):
  spec = toy_spec(splits={"train": ("train",), "test": ("test",)})
  with pytest.raises(UserError, match="no 'val' split"):
    data.num_examples(spec, "val", data_dir=data_dir)


def test_corrupt_images_are_a_clear_error(data_dir):
  spec = toy_spec("corrupt")
  with pytest.raises(UserError, match=r"do not decode.*img_0005"):
    few_shot(spec, 12, 0, data_dir)  # 12 shots take every train image of class "zero"
  as_test = toy_spec("corrupt", splits={"train": ("test",), "test": ("train",)})
  with pytest.raises(UserError, match="does not decode"):
    list(data.eval_batches(as_test, "test", batch_size=8, image_size=8, data_dir=data_dir))


def test_sampler_defaults_to_the_reference_where_it_can_be_reproduced():
  resolve, get = sampling.resolve_sampler, data.get_dataset
  assert resolve(get("imagenet"), None, None) == resolve(get("fgvc_aircraft"), None, None) == (
      "reference")
  assert resolve(get("eurosat"), None, None) == "numpy"  # splits carved by clip_lora_jax
  assert resolve(get("eurosat"), "split_zhou_EuroSAT.json", None) == "reference"
  assert resolve(get("imagenet"), None, "numpy") == "numpy"
  with pytest.raises(UserError, match=r"sampler='reference' needs the protocol's split file for "
                                      r"dtd.*split_zhou_DescribableTextures.json"):
    resolve(get("dtd"), None, "reference")
  with pytest.raises(UserError, match=r"sampler='torch': use one of 'reference', 'numpy'"):
    resolve(get("dtd"), None, "torch")


# Split files over the `wide` toy train images: (class order, None for every entry shuffled;
# fraction of each class's files listed as train, the rest as val).
SHAPES = {"grouped": ((3, 0, 4, 2, 1), 0.75), "interleaved": (None, 0.6),
          "descending": ((4, 3, 2, 1, 0), 0.9)}


def wide_split(shape: str) -> dict[str, list[list]]:
  """A split file's content in one of `SHAPES`: classes of 40, 3, 25, 17 and 2 images cut into
  train / val lists of sizes from 36 down to 1 (the "descending" one with files in reverse
  order), some classes missing from val, none in sorted class order."""
  rng = np.random.default_rng(list(SHAPES).index(shape))
  order, fraction = SHAPES[shape]
  content = {"train": [], "val": []}
  for label in order or range(len(CLASSES)):
    names = [name for _, l, name in toy_examples("train", "wide") if l == label]
    names = names[::-1] if shape == "descending" else list(rng.permutation(names))
    cut = math.ceil(fraction * len(names))
    content["train"] += [[name, label, CLASSES[label]] for name in names[:cut]]
    content["val"] += [[name, label, CLASSES[label]] for name in names[cut:]]
  if order is None:
    content = {role: [entries[i] for i in rng.permutation(len(entries))]
               for role, entries in content.items()}
  content["test"] = [[name, label, CLASSES[label]] for _, label, name in toy_examples("test")]
  return content


def write_content(path, content: dict[str, list[list]]) -> str:
  with open(path, "w") as f:
    json.dump(content, f)
  return str(path)


def choose_quietly(*args, **kwargs) -> sampling.Choice:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # short classes on purpose
    return sampling.choose(*args, **kwargs)


def file_id(path: str) -> int:
  return int(path[-8:-4])  # "zero/img_0012.png" -> 12


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_sampler_picks_the_reference_files_of_a_split_file(data_dir, tmp_path, shape):
  spec = toy_spec("wide")
  content = wide_split(shape)
  split_file = write_content(tmp_path / "split_zhou_Toy.json", content)
  tfds_builder = source.builder(spec, data_dir)
  label_of_path = {path: label for path, label, _ in content["train"] + content["val"]}
  for shots in (1, 2, 4, 8, 16):
    for seed in (1, 2, 3):
      choice = choose_quietly(spec, shots, seed, data_dir, split_file)
      expected = reference_sampling.split_file_draw(content, shots, seed)
      assert choice.sampler == "reference"
      for role, examples in (("train", choice.train), ("val", choice.val)):
        paths = splits.split_file_keys(spec, tfds_builder, examples)
        assert paths == expected[role], (shots, seed, role)
        assert examples.label.tolist() == [label_of_path[p] for p in paths]


def test_reference_few_shot_set_holds_the_reference_images_and_caches_per_sampler(
    data_dir, tmp_path, cache_dir):
  spec = toy_spec("wide")
  content = wide_split("interleaved")
  split_file = write_content(tmp_path / "split_zhou_Toy.json", content)
  expected = reference_sampling.split_file_draw(content, 4, 2)
  reference = few_shot(spec, 4, 2, data_dir, split_file=split_file)  # the default sampler
  assert [image_id(image) for image in reference.images] == list(map(file_id, expected["train"]))
  assert [image_id(image) for image in reference.val_images] == list(map(file_id, expected["val"]))
  numpy_set = few_shot(spec, 4, 2, data_dir, split_file=split_file, sampler="numpy")
  assert numpy_set.images != reference.images
  assert few_shot(spec, 4, 2, data_dir, split_file=split_file,
                  sampler="reference").images == reference.images
  assert len(os.listdir(os.path.join(cache_dir, "fewshot"))) == 2  # one set per sampler


def test_reference_sampler_names_the_chosen_entries_that_tfds_lacks(data_dir, tmp_path):
  spec = toy_spec("wide")
  content = wide_split("interleaved")
  # Class "four" listed by files TFDS does not have: 16 draws with replacement take most of them.
  gone = [[f"four/gone_{i}.png", 4, "four"] for i in range(7)]
  content["train"] = [entry for entry in content["train"] if entry[1] != 4] + gone
  split_file = write_content(tmp_path / "gone.json", content)
  missing = list(dict.fromkeys(
      p for p in reference_sampling.split_file_draw(content, 16, 1)["train"] if "gone" in p))
  assert len(missing) > 5
  with pytest.raises(UserError) as caught:
    choose_quietly(spec, 16, 1, data_dir, split_file)
  message = str(caught.value)
  assert message.startswith(f"{len(missing)} of the images that the reference sampler chooses")
  assert f"{', '.join(missing[:5])} and {len(missing) - 5} more" in message

  # A missing entry that is not chosen changes nothing: it takes part in the draw all the same.
  content = wide_split("interleaved")
  content["train"].insert(7, ["zero/gone.png", 0, "zero"])
  split_file = write_content(tmp_path / "one_gone.json", content)
  draws = {seed: reference_sampling.split_file_draw(content, 8, seed) for seed in range(1, 30)}
  unchosen = next(s for s, d in draws.items() if "zero/gone.png" not in d["train"])
  chosen = next(s for s, d in draws.items() if "zero/gone.png" in d["train"])
  choice = choose_quietly(spec, 8, unchosen, data_dir, split_file)
  assert splits.split_file_keys(spec, source.builder(spec, data_dir),
                                choice.train) == draws[unchosen]["train"]
  with pytest.raises(UserError, match=r"^1 of the images .*: zero/gone.png; without them"):
    choose_quietly(spec, 8, chosen, data_dir, split_file)


# An ImageNet-like train folder: label order (TFDS's) is not the folders' sorted order.
FOLDER_CLASSES = ("n02_kite", "n01_tench", "n03_goose")
FOLDER_COUNTS = (23, 20, 30)


class ClipLoraJaxFolder(tfds.core.GeneratorBasedBuilder):
  """Class folders of PNGs in the manual directory, read in `os.listdir` order."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "<class>/<file>.png"

  def _info(self):
    return toy_info(self, FOLDER_CLASSES)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root):
    for folder in os.listdir(root):
      for file_name in os.listdir(os.path.join(root, folder)):
        yield f"{folder}/{file_name}", {"image": os.path.join(root, folder, file_name),
                                        "label": folder, "file_name": file_name}


def folder_spec() -> DatasetSpec:
  return DatasetSpec(name="toy_folder", tfds_name="clip_lora_jax_folder",
                     class_names=FOLDER_CLASSES, splits={"train": ("train",), "test": ("train",)},
                     file_key="file_name", reference_order=IMAGE_FOLDER)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[str, str]:
  """(train folder, TFDS data dir): class folders and files created in an unsorted order, file
  numbers unpadded (so that name order is not number order)."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for label in (2, 0, 1):
    folder = root / FOLDER_CLASSES[label]
    folder.mkdir()
    for number in rng.permutation(FOLDER_COUNTS[label]):
      (folder / f"{FOLDER_CLASSES[label]}_{number}.png").write_bytes(toy_png(int(number)))
  data_dir = str(tmp_path_factory.mktemp("folder_tfds"))
  tfds.builder("clip_lora_jax_folder", data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root), num_shards=2))
  return str(root), data_dir


def test_reference_sampler_picks_the_reference_files_of_an_image_folder(image_folder):
  root, data_dir = image_folder
  spec = folder_spec()
  tfds_builder = source.builder(spec, data_dir)
  for shots in (1, 2, 4, 8, 16):
    for seed in (1, 2, 3):
      choice = sampling.choose(spec, shots, seed, data_dir)
      expected = reference_sampling.image_folder_draw(root, shots, seed)
      assert choice.sampler == "reference"
      for role, examples in (("train", choice.train), ("val", choice.val)):
        folders = splits.tfds_class_names(spec, tfds_builder, examples)
        paths = [f"{folder}/{name.decode()}" for folder, name in zip(folders, examples.file_name)]
        assert paths == expected[role], (shots, seed, role)
        assert [spec.class_names[label] for label in examples.label] == folders
  # 17 shots + 4 validation images: more than class n01_tench has; the reference fails there.
  with pytest.raises(UserError, match=r"^1 toy_folder classes have fewer than the 21 training "
                                      r"images .*: n01_tench \(20\); use sampler='numpy'"):
    sampling.choose(spec, 17, 1, data_dir)


# Published per-seed lists of shots (CoOp's split_fewshot/shot_K-seed_S.pkl, or JSON lists).


def published_list(shots: int, seed: int) -> dict[str, list[list]]:
  """A K-shot list as a follow-up work publishes one: an arbitrary draw (repeats allowed) from
  the wide toy split, in no particular order."""
  rng = np.random.default_rng(100 * shots + seed)
  train = toy_examples("train", "wide")
  content = {"train": [], "val": []}
  for label in (3, 0, 2, 1, 4):
    names = [name for _, l, name in train if l == label]
    picked = rng.choice(len(names), shots + min(shots, 4), replace=len(names) < shots + 4)
    content["train"] += [[names[i], label, CLASSES[label]] for i in picked[:shots]]
    content["val"] += [[names[i], label, CLASSES[label]] for i in picked[shots:]]
  return content


class Datum:
  """Dassl's `Datum` as CoOp pickles it (attributes only)."""

  def __init__(self, impath: str, label: int, classname: str):
    self._impath, self._label, self._domain, self._classname = impath, label, 0, classname


def write_coop_pickle(path, content: dict[str, list[list]], prefix: str) -> None:
  """`content` as CoOp's cache of a draw: {"train": [Datum], "val": [Datum]}, absolute paths;
  Datum pickled under Dassl's module name (stand-in modules while pickling)."""
  names = ("dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset")
  saved = {name: sys.modules.get(name) for name in names}
  sys.modules.update({name: type(sys)(name) for name in names})
  sys.modules[names[-1]].Datum = Datum
  Datum.__module__ = names[-1]
  try:
    with open(path, "wb") as f:
      pickle.dump({role: [Datum(f"{prefix}/{p}", label, name) for p, label, name in entries]
                   for role, entries in content.items()}, f, protocol=pickle.HIGHEST_PROTOCOL)
  finally:
    for name, module in saved.items():
      if module is None:
        del sys.modules[name]
      else:
        sys.modules[name] = module


@pytest.mark.parametrize("form", ["json", "pkl"])
def test_published_lists_give_exactly_their_shots_in_order(data_dir, tmp_path, form):
  spec = toy_spec("wide")
  tfds_builder = source.builder(spec, data_dir)
  lists = tmp_path / "split_fewshot"
  lists.mkdir()
  for shots, seed in ((1, 1), (4, 2), (16, 3)):
    content = published_list(shots, seed)
    if form == "json":
      write_content(lists / f"shot_{shots}-seed_{seed}.json", content)
    else:
      write_coop_pickle(lists / f"shot_{shots}-seed_{seed}.pkl", content,
                        "/home/someone/data/toy/images")
    choice = sampling.choose(spec, shots, seed, data_dir, shot_lists=str(lists))
    assert choice.sampler == "lists"
    for role, examples in (("train", choice.train), ("val", choice.val)):
      assert splits.split_file_keys(spec, tfds_builder, examples) == [
          entry[0] for entry in content[role]], (shots, seed, role)
      assert examples.label.tolist() == [entry[1] for entry in content[role]]
  few = few_shot(spec, 4, 2, data_dir, shot_lists=str(lists))
  assert [image_id(i) for i in few.images] == [
      file_id(e[0]) for e in published_list(4, 2)["train"]]


def test_published_lists_are_checked_and_cached_by_content(data_dir, tmp_path, cache_dir):
  spec = toy_spec("wide")
  lists = tmp_path / "lists"
  lists.mkdir()
  content = published_list(2, 1)
  write_content(lists / "shot_2-seed_1.json", content)
  with pytest.raises(UserError, match=r"no list for 4 shots and seed 1 .*holds shot_2-seed_1"):
    sampling.choose(spec, 4, 1, data_dir, shot_lists=str(lists))
  with pytest.raises(UserError, match="the 'lists' sampler reads the shots"):
    sampling.choose(spec, 2, 1, data_dir, sampler="numpy", shot_lists=str(lists))
  with pytest.raises(UserError, match="is not a 4-shot list: .* zero \\(2\\)"):
    write_content(lists / "shot_4-seed_1.json", content)
    sampling.choose(spec, 4, 1, data_dir, shot_lists=str(lists))
  gone = {role: list(entries) for role, entries in content.items()}
  gone["train"][0] = ["/elsewhere/three/gone.png", 3, "three"]
  write_content(lists / "shot_2-seed_2.json", gone)
  with pytest.raises(UserError, match=r"^1 of the images of shot list .*: "
                                      r"/elsewhere/three/gone.png; is this a list of toy"):
    sampling.choose(spec, 2, 2, data_dir, shot_lists=str(lists))
  first = few_shot(spec, 2, 1, data_dir, shot_lists=str(lists))
  content["train"][0], content["train"][1] = content["train"][1], content["train"][0]
  write_content(lists / "shot_2-seed_1.json", content)
  second = few_shot(spec, 2, 1, data_dir, shot_lists=str(lists))
  assert second.images[:2] == first.images[1::-1]  # a changed list is not served from the cache


def test_a_pickle_that_holds_anything_but_datums_is_refused_unrun(tmp_path):
  class Payload:
    def __reduce__(self):
      return (os.remove, (str(tmp_path / "victim"),))

  (tmp_path / "victim").write_text("still here")
  lists = tmp_path / "lists"
  lists.mkdir()
  with open(lists / "shot_1-seed_1.pkl", "wb") as f:
    pickle.dump({"train": [Payload()], "val": []}, f)
  with pytest.raises(UserError, match="names posix.remove, which a list of Dassl Datum"):
    sampling.read_shot_list(str(lists / "shot_1-seed_1.pkl"))
  assert (tmp_path / "victim").read_text() == "still here"
