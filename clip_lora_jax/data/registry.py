"""The 11 benchmark datasets of the CoOp few-shot protocol, which CLIP-LoRA follows, in TFDS.

A `DatasetSpec` says which TFDS dataset holds a benchmark, which TFDS examples form its train /
val / test splits, what its classes are called in prompts, and which templates prompt them.

Class names are the benchmark's, ready to be put into a template: the label order is the one of
the CoOp protocol (so that the labels of its `split_zhou_<Dataset>.json` files and the base / novel
halves of base-to-novel experiments match), and underscores are already spaces (the protocol
replaces them when it builds prompts). They are derived from the label names of the TFDS builder,
so a spec is built without any data on disk.

Where TFDS's splits are not the benchmark's, the benchmark splits are carved from TFDS splits per
class, at random with a fixed seed, in the protocol's proportions (`Carve`); a split file of the
protocol, when given, replaces that by the protocol's exact lists of files (see `splits.py`).

Besides the benchmarks, `get_dataset` makes a spec of the user's own images: `folder:/root` or
`csv:/file.csv` (see `user_datasets.py`), read through our `user_images` TFDS builder, whose
config the spec carries, with the benchmark rules for splitting them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from clip_lora_jax.data import builders  # pylint: disable=unused-import  (registers our builders)
from clip_lora_jax.data import user_datasets
from clip_lora_jax.errors import UserError

# CLIP-LoRA trains and tests every dataset with this single template.
DEFAULT_TEMPLATE = "a photo of a {}."
ROLES = ("train", "val", "test")
# How the reference code lists a dataset it reads without a split file (`reference_order`):
# its official lists, in TFDS's canonical order (our builder keeps their order) ...
LIST_ORDER = "lists"
# ... or a torchvision ImageFolder of the train images: classes sorted by TFDS class name (the
# folder name), files sorted by name within each.
IMAGE_FOLDER = "image_folder"


@dataclasses.dataclass(frozen=True)
class Carve:
  """A benchmark split cut at random, class by class, out of a pool of TFDS splits.

  Each class's examples are shuffled with a fixed seed and cut into consecutive parts of
  `round(n * fraction)` examples, the last part taking the rest (the CoOp protocol's rule);
  `part` selects one of them.
  """
  pool: tuple[str, ...]
  fractions: tuple[float, ...]
  part: int


@dataclasses.dataclass(frozen=True)
class ClassSubset:
  """The classes of a dataset as classes of another: class i is class `ids[i]` of `dataset`.

  With `same_examples`, the examples are that dataset's too: its splits and few-shot draws,
  restricted to these classes and relabelled (base / novel halves). Without, the dataset has its
  own examples of those classes (ImageNet-A), so that an adapter with a head over the classes of
  `dataset` scores it through the columns `ids`.
  """
  dataset: str
  ids: tuple[int, ...]
  same_examples: bool

  def relabel(self, labels: np.ndarray) -> np.ndarray:
    """Labels of `dataset` -> labels of the subset, -1 for classes outside it."""
    table = np.full(max(self.ids + (int(np.max(labels, initial=-1)),)) + 1, -1, np.int32)
    table[list(self.ids)] = np.arange(len(self.ids), dtype=np.int32)
    return table[np.asarray(labels)]


# A benchmark split is either every example of some TFDS splits, or a carved part of them.
SplitSource = tuple[str, ...] | Carve
# (TFDS split, file name feature, TFDS class name) -> the image path used in the split file.
SplitFilePath = Callable[[str, str, str], str]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset (a benchmark, or the user's images): where its examples are in TFDS and how to
  prompt its classes.

  Attributes:
    name: benchmark name (a key of `DATASET_NAMES`), or `folder:/root` / `csv:/file.csv`.
    tfds_name: TFDS builder name, with config (e.g. `eurosat/rgb`).
    class_names: benchmark class names in benchmark label order, ready for a template.
    splits: benchmark role ("train", "val", "test") -> its `SplitSource`. A dataset without a
      "val" role (ImageNet) draws its validation shots from the train split.
    label_map: TFDS label id -> benchmark label id, -1 for a dropped class; None is the identity.
    coop_template: the CoOp protocol's zero-shot template for this dataset.
    ensemble_templates: templates for prompt ensembling (CLIP's 80 for ImageNet); defaults to
      `(coop_template,)`.
    template: the single template of CLIP-LoRA.
    image_key, label_key: TFDS feature names of the image and the label.
    file_key: TFDS feature holding each example's file name, None if TFDS keeps none.
    split_file_path: turns an example's (TFDS split, file name, TFDS class name) into its path in
      the protocol's split file; None means the file name as is.
    split_file_name: the protocol's split file for this dataset, for messages.
    reference_order: how the reference code lists the dataset when it reads no split file
      (`LIST_ORDER` or `IMAGE_FOLDER`), so that its few-shot sets can be drawn without one; None
      when it reads the protocol's split file.
    manual_download: what to put into the TFDS manual directory before preparing, or None when
      TFDS downloads the data itself.
    subset_of: its classes as classes of another dataset (`ClassSubset`), or None.
    builder_config: for a dataset of the user's own images, the config of our `user_images`
      builder listing them, which `source.builder` prepares on first use; None for a benchmark.
  """
  name: str
  tfds_name: str
  class_names: tuple[str, ...]
  splits: Mapping[str, SplitSource]
  label_map: tuple[int, ...] | None = None
  coop_template: str = DEFAULT_TEMPLATE
  ensemble_templates: tuple[str, ...] = ()
  template: str = DEFAULT_TEMPLATE
  image_key: str = "image"
  label_key: str = "label"
  file_key: str | None = None
  split_file_path: SplitFilePath | None = None
  split_file_name: str | None = None
  reference_order: str | None = None
  manual_download: str | None = None
  subset_of: ClassSubset | None = None
  builder_config: tfds.core.BuilderConfig | None = None

  def __post_init__(self):
    if not self.ensemble_templates:
      object.__setattr__(self, "ensemble_templates", (self.coop_template,))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def split_file_key(self, tfds_split: str, file_name: str, tfds_class: str) -> str:
    """The path under which the protocol's split file lists a TFDS example."""
    if self.split_file_path is None:
      return file_name
    return self.split_file_path(tfds_split, file_name, tfds_class)

  @property
  def tfds_splits(self) -> tuple[str, ...]:
    """Every TFDS split the benchmark splits draw from, in first-use order."""
    names = []
    for source in self.splits.values():
      for split in (source.pool if isinstance(source, Carve) else source):
        if split not in names:
          names.append(split)
    return tuple(names)


def _carved(pool: tuple[str, ...], fractions: tuple[float, ...],
            roles: tuple[str, ...]) -> dict[str, Carve]:
  """Roles taking consecutive parts of `pool` carved in `fractions`."""
  return {role: Carve(pool, fractions, part) for part, role in enumerate(roles)}


# Random 50/20/30 split of every image (Caltech-101, Flowers-102, Food-101, DTD, EuroSAT).
def _random_50_20_30(pool: tuple[str, ...]) -> dict[str, Carve]:
  return _carved(pool, (0.5, 0.2, 0.3), ROLES)


# Official test split; the official train split cut 80/20 into train and val.
_OFFICIAL_TEST_TRAIN_80_20 = {**_carved(("train",), (0.8, 0.2), ("train", "val")),
                              "test": ("test",)}


def _asset(name: str) -> str:
  return importlib.resources.files("clip_lora_jax.data").joinpath("assets", name).read_text()


def _tfds_class_names(tfds_name: str) -> list[str]:
  """The label names of a TFDS builder, from its code (no data needed)."""
  return list(tfds.builder(tfds_name).info.features["label"].names)


def _prompt_ready(names) -> tuple[str, ...]:
  return tuple(name.replace("_", " ") for name in names)


def _imagenet() -> DatasetSpec:
  curated = json.loads(_asset("imagenet.json"))
  return DatasetSpec(
      name="imagenet", tfds_name="imagenet2012", class_names=tuple(curated["class_names"]),
      splits={"train": ("train",), "test": ("validation",)},
      ensemble_templates=tuple(curated["templates"]), file_key="file_name",
      reference_order=IMAGE_FOLDER,
      manual_download=("ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (register at "
                       "https://image-net.org/download-images to get them)"))


def _sun397() -> DatasetSpec:
  # "/a/apartment_building/outdoor" -> "outdoor apartment building".
  names = [" ".join(reversed(n.split("/")[2:])) for n in _tfds_class_names("sun397")]
  return DatasetSpec(
      name="sun397", tfds_name="sun397/standard-part1-120k", class_names=_prompt_ready(names),
      splits=_OFFICIAL_TEST_TRAIN_80_20, file_key="file_name",
      split_file_path=lambda split, file_name, cls: file_name.lstrip("/"),
      split_file_name="split_zhou_SUN397.json")


def _fgvc_aircraft() -> DatasetSpec:
  return DatasetSpec(
      name="fgvc_aircraft", tfds_name="fgvc_aircraft",
      class_names=tuple(_tfds_class_names("fgvc_aircraft")),
      splits={"train": ("train",), "val": ("validation",), "test": ("test",)},
      coop_template="a photo of a {}, a type of aircraft.", file_key="file_name",
      reference_order=LIST_ORDER, manual_download=builders.fgvc_aircraft.MANUAL_FILES)


_EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
    "River": "River", "SeaLake": "Sea or Lake",
}


def _eurosat() -> DatasetSpec:
  return DatasetSpec(
      name="eurosat", tfds_name="eurosat/rgb",
      class_names=tuple(_EUROSAT_NAMES[n] for n in _tfds_class_names("eurosat/rgb")),
      splits=_random_50_20_30(("train",)), coop_template="a centered satellite photo of {}.",
      file_key="filename", split_file_path=lambda split, file_name, cls: f"{cls}/{file_name}",
      split_file_name="split_zhou_EuroSAT.json")


def _stanford_cars() -> DatasetSpec:
  # "Acura RL Sedan 2012" -> "2012 Acura RL Sedan".
  names = [" ".join([n.split(" ")[-1], *n.split(" ")[:-1]]) for n in _tfds_class_names("cars196")]
  return DatasetSpec(
      name="stanford_cars", tfds_name="cars196", class_names=tuple(names),
      splits=_OFFICIAL_TEST_TRAIN_80_20, file_key="id",
      split_file_path=lambda split, file_name, cls: f"cars_{split}/{file_name}.jpg",
      split_file_name="split_zhou_StanfordCars.json",
      manual_download=("cars_train.tgz, cars_test.tgz, car_devkit.tgz and "
                       "cars_test_annos_withlabels.mat (the original Stanford download links are "
                       "dead: get these four files, under these names, from a mirror)"))


def _food101() -> DatasetSpec:
  return DatasetSpec(
      name="food101", tfds_name="food101", class_names=_prompt_ready(_tfds_class_names("food101")),
      splits=_random_50_20_30(("train", "validation")),
      coop_template="a photo of {}, a type of food.", split_file_name="split_zhou_Food101.json")


def _oxford_pets() -> DatasetSpec:
  names = [n.lower() for n in _tfds_class_names("oxford_iiit_pet")]
  return DatasetSpec(
      name="oxford_pets", tfds_name="oxford_iiit_pet", class_names=_prompt_ready(names),
      splits=_OFFICIAL_TEST_TRAIN_80_20, coop_template="a photo of a {}, a type of pet.",
      file_key="file_name", split_file_name="split_zhou_OxfordPets.json")


# TFDS's Flowers-102 names differ from the protocol's `cat_to_name.json` in two places.
_FLOWERS_NAMES = {"pink-yellow dahlia?": "pink-yellow dahlia", "lotus": "lotus lotus"}


def _oxford_flowers() -> DatasetSpec:
  names = [_FLOWERS_NAMES.get(n, n) for n in _tfds_class_names("oxford_flowers102")]
  return DatasetSpec(
      name="oxford_flowers", tfds_name="oxford_flowers102", class_names=tuple(names),
      splits=_random_50_20_30(("train", "validation", "test")),
      coop_template="a photo of a {}, a type of flower.", file_key="file_name",
      split_file_name="split_zhou_OxfordFlowers.json")


# TFDS lower-cases Caltech-101's folder names; the protocol sorts the original ones (capitals
# first), drops two folders and renames four classes.
_CALTECH_FOLDERS = {"background_google": "BACKGROUND_Google", "faces": "Faces",
                    "faces_easy": "Faces_easy", "leopards": "Leopards", "motorbikes": "Motorbikes"}
_CALTECH_DROPPED = ("BACKGROUND_Google", "Faces_easy")
_CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
                  "Motorbikes": "motorbike"}


def _caltech_folder(tfds_name: str) -> str:
  return _CALTECH_FOLDERS.get(tfds_name, tfds_name)


def _caltech101() -> DatasetSpec:
  folders = [_caltech_folder(n) for n in _tfds_class_names("caltech101")]
  kept = sorted(f for f in folders if f not in _CALTECH_DROPPED)
  label_map = tuple(kept.index(f) if f in kept else -1 for f in folders)
  return DatasetSpec(
      name="caltech101", tfds_name="caltech101",
      class_names=_prompt_ready(_CALTECH_NAMES.get(f, f) for f in kept),
      splits=_random_50_20_30(("train", "test")), label_map=label_map,
      file_key="image/file_name",
      split_file_path=lambda split, file_name, cls: f"{_caltech_folder(cls)}/{file_name}",
      split_file_name="split_zhou_Caltech101.json")


def _dtd() -> DatasetSpec:
  return DatasetSpec(
      name="dtd", tfds_name="dtd", class_names=_prompt_ready(_tfds_class_names("dtd")),
      splits=_random_50_20_30(("train", "validation", "test")), coop_template="{} texture.",
      file_key="file_name", split_file_name="split_zhou_DescribableTextures.json")


def _ucf101() -> DatasetSpec:
  return DatasetSpec(
      name="ucf101", tfds_name="ucf101_midframes",
      class_names=_prompt_ready(_tfds_class_names("ucf101_midframes")),
      splits={**_carved(("train",), (0.8, 0.2), ("train", "val")), "test": ("test",)},
      coop_template="a photo of a person doing {}.", file_key="file_name",
      split_file_name="split_zhou_UCF101.json",
      manual_download=builders.ucf101_frames.MANUAL_FILES)


_FACTORIES: dict[str, Callable[[], DatasetSpec]] = {
    "imagenet": _imagenet, "sun397": _sun397, "fgvc_aircraft": _fgvc_aircraft,
    "eurosat": _eurosat, "stanford_cars": _stanford_cars, "food101": _food101,
    "oxford_pets": _oxford_pets, "oxford_flowers": _oxford_flowers, "caltech101": _caltech101,
    "dtd": _dtd, "ucf101": _ucf101,
}
DATASET_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def _imagenet_variant(name: str, tfds_name: str, subset: str | None = None) -> DatasetSpec:
  """An ImageNet test set of the domain-shift protocol: TFDS labels are ImageNet-1k's; `subset`
  names the 200 classes of ImageNet-A or -R (sorted WordNet ids: their 200-way label order)."""
  imagenet = get_dataset("imagenet")
  ids, label_map = tuple(range(imagenet.num_classes)), None
  if subset is not None:
    wnids = _tfds_class_names("imagenet2012")
    ids = tuple(wnids.index(wnid) for wnid in json.loads(_asset("imagenet_subsets.json"))[subset])
    label_map = tuple(ClassSubset("imagenet", ids, False).relabel(np.arange(len(wnids))).tolist())
  return DatasetSpec(
      name=name, tfds_name=tfds_name, class_names=tuple(imagenet.class_names[i] for i in ids),
      splits={"test": ("test",)}, label_map=label_map,
      ensemble_templates=imagenet.ensemble_templates,
      subset_of=ClassSubset("imagenet", ids, same_examples=False))


# The domain-shift test sets of a model trained on ImageNet (test split only).
_DOMAIN_SHIFT: dict[str, Callable[[], DatasetSpec]] = {
    "imagenet_v2": lambda: _imagenet_variant("imagenet_v2", "imagenet_v2/matched-frequency"),
    "imagenet_sketch": lambda: _imagenet_variant("imagenet_sketch", "imagenet_sketch"),
    "imagenet_a": lambda: _imagenet_variant("imagenet_a", "imagenet_a", "imagenet_a"),
    "imagenet_r": lambda: _imagenet_variant("imagenet_r", "imagenet_r", "imagenet_r"),
}
DOMAIN_SHIFT_NAMES: tuple[str, ...] = tuple(_DOMAIN_SHIFT)
# The class halves of the base-to-novel protocol: `get_dataset("dtd/base")`.
CLASS_SPLITS = ("base", "novel")


def base_novel_ids(num_classes: int) -> dict[str, tuple[int, ...]]:
  """The base-to-novel rule (CoCoOp): label ids sorted, base = the first ceil(n / 2), novel =
  the rest."""
  cut = math.ceil(num_classes / 2)
  return {"base": tuple(range(cut)), "novel": tuple(range(cut, num_classes))}


def class_subset(spec: DatasetSpec, ids: Sequence[int], name: str) -> DatasetSpec:
  """`spec` restricted to its classes `ids`, relabelled 0.. in that order, as dataset `name`:
  its examples are those of `spec` of these classes (splits and few-shot draws: see
  `ClassSubset`)."""
  subset = ClassSubset(spec.name, tuple(ids), same_examples=True)
  tfds_labels = np.asarray(spec.label_map if spec.label_map is not None else
                           range(spec.num_classes))
  kept = np.where(tfds_labels >= 0, subset.relabel(np.maximum(tfds_labels, 0)), -1)
  return dataclasses.replace(spec, name=name, class_names=tuple(spec.class_names[i] for i in ids),
                             label_map=tuple(kept.tolist()), subset_of=subset)


def _class_split(name: str) -> DatasetSpec:
  dataset, _, part = name.partition("/")
  if dataset not in _FACTORIES or part not in CLASS_SPLITS:
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}, "
                    f"{', '.join(DOMAIN_SHIFT_NAMES)}, NAME/base or NAME/novel (the class "
                    "halves of the base-to-novel protocol), or "
                    f"{user_datasets.FOLDER}/path/to/images or {user_datasets.CSV}/path/to/file.csv")
  spec = get_dataset(dataset)
  return class_subset(spec, base_novel_ids(spec.num_classes)[part], name)


@functools.lru_cache(maxsize=None)
def _benchmark(name: str) -> DatasetSpec:
  """A benchmark (`DATASET_NAMES`), a domain-shift test set (`DOMAIN_SHIFT_NAMES`), or
  `BENCHMARK/base`, `BENCHMARK/novel` (base-to-novel halves)."""
  if name in _FACTORIES:
    return _FACTORIES[name]()
  if name in _DOMAIN_SHIFT:
    return _DOMAIN_SHIFT[name]()
  return _class_split(name)


# The benchmark splits of a user dataset, by its TFDS splits: the rules of the benchmarks above.
_USER_SPLITS: dict[tuple[str, ...], Mapping[str, SplitSource]] = {
    user_datasets.ALL_IN_ONE: _random_50_20_30(("train",)),
    user_datasets.TRAIN_TEST: _OFFICIAL_TEST_TRAIN_80_20,
    user_datasets.TRAIN_VAL_TEST: {"train": ("train",), "val": ("validation",), "test": ("test",)},
}


def _user_dataset(name: str, class_names_file: str | None) -> DatasetSpec:
  """The spec of `folder:...` or `csv:...` dataset `name`, its files listed and checked."""
  listing = user_datasets.listing(name)
  return DatasetSpec(
      name=listing.name, tfds_name=builders.user_images.NAME,
      class_names=user_datasets.class_names(listing.classes, class_names_file),
      splits=_USER_SPLITS[listing.tfds_splits], file_key="file_name",
      builder_config=listing.builder_config())


def get_dataset(name: str, class_names_file: str | None = None) -> DatasetSpec:
  """The spec of dataset `name` (a benchmark, a domain-shift test set or a base-to-novel half:
  see `_benchmark`), or of the user's images
  `folder:/root` or `csv:/file.csv`, with prompt names from `class_names_file` (a JSON object
  {class folder: name}; user datasets only). A user dataset's files are listed and checked anew
  at each call, so that a changed folder is seen."""
  if user_datasets.is_user_dataset(name):
    return _user_dataset(name, class_names_file)
  if class_names_file is not None:
    raise UserError(f"class_names_file applies to {user_datasets.FOLDER} and "
                    f"{user_datasets.CSV} datasets only, not to the benchmark {name!r}: leave it "
                    "unset")
  return _benchmark(name)
