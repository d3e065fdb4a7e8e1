"""Which examples form a K-shot set: the reference code's choice, a published list, or our numpy
one.

Both samplers draw, for a seed, min(K, 4) validation shots and K training shots per class, from
labels and file names alone (no image is read here), and return them in the order drawn.

`reference` picks, file for file and in the same order, the images that the official CLIP-LoRA
code (and CoOp's and Tip-Adapter's, which share the procedure) picks for the same seed. That code
calls Python's `random.seed(seed)` once, and nothing else draws from `random` before it samples:

- a dataset read from a split file (`split_zhou_<Dataset>.json`), or FGVC-Aircraft from its
  official lists in file order: first the validation shots (n = min(K, 4)), then the training
  shots (n = K), each from its split's list: the items are grouped by label in order of first
  appearance, and each group in that order gives `random.sample(items, n)`, or
  `random.choices(items, k=n)` when it has fewer than n items;
- ImageNet: the train images as torchvision's ImageFolder lists them (class folders sorted by
  name, files sorted by name within each), grouped by label in that order; each class gives
  `random.sample(items, K + min(K, 4))`, the first K for training, the rest for validation.

Which positions `random.sample` and `random.choices` pick depends only on the list's length and
the generator's state, never on the items, so positions are drawn in place of the items. The
chosen split-file entries are then found in TFDS by path; one that TFDS lacks is an error naming
it (entries that were not chosen may be missing: they do not change the choice).

`numpy` is the sampler for datasets read without a split file, whose benchmark splits are carved
by this library and so are not the reference's anyway: a numpy generator seeded with the seed,
classes in label order, each class's shots without replacement, or all of its items plus draws
with replacement up to K; where the benchmark has no validation split (ImageNet), the
validation shots come from the train split and are left out of the training pool.

`lists` reads the shots from a published per-(K, seed) list instead of drawing them: a directory
(`shot_lists`) holding `shot_<K>-seed_<S>.json` files ({"train": [[path, label, class name], ...],
"val": [...]}, the entries of a split file) or CoOp's own caches of its draws,
`shot_<K>-seed_<S>.pkl` (its `split_fewshot/` folder: Dassl `Datum` objects, read by a restricted
unpickler that builds nothing else). Entries are found in TFDS by path (an absolute path, as
CoOp's pickles hold, by its longest suffix that TFDS knows); every class listed must have K
training entries, and an entry TFDS lacks is an error naming it.

Either way a class with fewer than n items is warned about, and a class with none gets no shots
(warned too).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import random
import types
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from clip_lora_jax.data import source, splits
from clip_lora_jax.data.registry import IMAGE_FOLDER, DatasetSpec
from clip_lora_jax.errors import UserError

REFERENCE = "reference"
NUMPY = "numpy"
LISTS = "lists"
SAMPLERS = (REFERENCE, NUMPY, LISTS)
LIST_ROLES = ("train", "val")
MAX_VAL_SHOTS = 4
# How many names an error lists before it only counts.
_NAMED = 5


@dataclasses.dataclass(frozen=True)
class Choice:
  """The examples of a few-shot set, in the order drawn (repeated where a class was short).

  Attributes:
    train: the training shots.
    val: the validation shots, disjoint from the training ones.
    sampler: the sampler that chose them (`REFERENCE`, `NUMPY` or `LISTS`).
  """
  train: splits.Examples
  val: splits.Examples
  sampler: str


def resolve_sampler(spec: DatasetSpec, split_file: str | None, sampler: str | None,
                    shot_lists: str | None = None) -> str:
  """The sampler to use: `sampler` once checked; by default (None) `LISTS` when `shot_lists`
  names a directory of published lists, else `REFERENCE` wherever the reference's choice can be
  reproduced (a split file is given, or the dataset is one the reference reads without a split
  file: ImageNet, FGVC-Aircraft), `NUMPY` elsewhere."""
  reproducible = split_file is not None or spec.reference_order is not None
  if sampler is None:
    return LISTS if shot_lists is not None else REFERENCE if reproducible else NUMPY
  if sampler not in SAMPLERS:
    raise UserError(f"sampler={sampler!r}: use one of {', '.join(map(repr, SAMPLERS))}")
  if (sampler == LISTS) != (shot_lists is not None):
    raise UserError(f"sampler={sampler!r} with shot_lists={shot_lists!r}: the 'lists' sampler "
                    "reads the shots from the shot_lists directory, and only it does; give both, "
                    "or leave sampler unset")
  if sampler == REFERENCE and not reproducible:
    split_file_name = spec.split_file_name or "split_zhou_<Dataset>.json"
    raise UserError(
        f"sampler='reference' needs the protocol's split file for {spec.name}: the reference "
        f"code draws its shots from the lists of {split_file_name}, so pass that file as "
        f"split_file, or use sampler='numpy' on the splits carved by clip_lora_jax")
  return sampler


def _named(names: Sequence[str]) -> str:
  """The first few of `names`, then how many more."""
  more = len(names) - _NAMED
  return ", ".join(names[:_NAMED]) + (f" and {more} more" if more > 0 else "")


def _warn_shortages(counts: Mapping[int, int], n: int, class_names: Sequence[str], what: str,
                    filling: str) -> None:
  """Warns about the classes with fewer than `n` items (`counts`: items per label)."""
  short = [f"{class_names[label]} ({count})" for label, count in sorted(counts.items())
           if 0 < count < n]
  empty = [name for label, name in enumerate(class_names) if not counts.get(label)]
  if short:
    warnings.warn(f"{len(short)} classes have fewer than {n} {what} examples and {filling}: "
                  f"{', '.join(short)}")
  if empty:
    warnings.warn(f"{len(empty)} classes have no {what} examples and get no shots: "
                  f"{', '.join(empty)}")


def sample_shots(labels: np.ndarray, class_names: Sequence[str], shots: int,
                 rng: np.random.Generator, exclude: np.ndarray | None = None,
                 what: str = "train") -> np.ndarray:
  """The numpy sampler: positions of `shots` examples of each class of `labels`, not in
  `exclude`.

  Without replacement when a class has enough examples; otherwise all of them, in random order,
  then draws with replacement up to `shots` (warned). Classes are visited in label order.
  """
  available = np.ones(len(labels), bool)
  if exclude is not None:
    available[exclude] = False
  order = np.argsort(labels, kind="stable")
  bounds = np.searchsorted(labels[order], np.arange(len(class_names) + 1))
  chosen, counts = [], {}
  for label in range(len(class_names)):
    members = order[bounds[label]:bounds[label + 1]]
    members = members[available[members]]
    counts[label] = len(members)
    if len(members) >= shots:
      chosen.append(rng.choice(members, shots, replace=False))
    elif len(members):
      chosen.append(np.concatenate([rng.permutation(members),
                                    rng.choice(members, shots - len(members))]))
  _warn_shortages(counts, shots, class_names, what,
                  "are filled up by sampling with replacement")
  return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def _numpy_choice(spec: DatasetSpec, shots: int, seed: int, data_dir: str | None,
                  split_file: str | None, cache_dir: str | None) -> Choice:
  train = splits.benchmark_split(spec, "train", data_dir, split_file, cache_dir)
  has_val = splits.has_split(spec, "val", split_file)
  val_pool = (splits.benchmark_split(spec, "val", data_dir, split_file, cache_dir) if has_val
              else train)
  rng = np.random.default_rng(seed)
  val_positions = sample_shots(val_pool.label, spec.class_names, min(shots, MAX_VAL_SHOTS), rng,
                               what="validation")
  train_positions = sample_shots(train.label, spec.class_names, shots, rng,
                                 exclude=None if has_val else val_positions)
  return Choice(train.subset(train_positions), val_pool.subset(val_positions), NUMPY)


def _groups(labels: Sequence[int]) -> dict[int, list[int]]:
  """Positions by label, labels in order of first appearance: the reference's dict of lists."""
  groups: dict[int, list[int]] = {}
  for position, label in enumerate(labels):
    groups.setdefault(int(label), []).append(position)
  return groups


def reference_draw(labels: Sequence[int], n: int, rng: random.Random) -> list[int]:
  """Positions of `n` items per label of `labels`, drawn as the reference draws one split's
  shots: labels in order of first appearance, `rng.sample(items, n)` for each, or
  `rng.choices(items, k=n)` for a label with fewer than `n` items."""
  chosen = []
  for members in _groups(labels).values():
    chosen.extend(rng.sample(members, n) if len(members) >= n else rng.choices(members, k=n))
  return chosen


def _reference_val_then_train(labels: Mapping[str, Sequence[int]], shots: int, seed: int
                              ) -> dict[str, list[int]]:
  """role -> positions into `labels[role]`: the validation shots, then the training shots,
  drawn from one generator seeded once, as the reference does."""
  rng = random.Random(seed)
  return {role: reference_draw(labels[role], n, rng)
          for role, n in (("val", min(shots, MAX_VAL_SHOTS)), ("train", shots))}


def _warn_reference_shortages(labels: Mapping[str, Sequence[int]], shots: int,
                              class_names: Sequence[str]) -> None:
  for role, n, what in (("val", min(shots, MAX_VAL_SHOTS), "validation"),
                        ("train", shots, "train")):
    _warn_shortages(collections.Counter(int(label) for label in labels[role]), n, class_names,
                    what, "are drawn with replacement (random.choices), as the reference does")


def _reference_split_file(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder,
                          shots: int, seed: int, split_file: str,
                          cache_dir: str | None) -> Choice:
  """The reference's draw from a split file's val and train lists, found in TFDS by path."""
  content = splits.read_split_file(split_file)
  labels = {role: [int(entry[1]) for entry in content[role]] for role in ("val", "train")}
  drawn = _reference_val_then_train(labels, shots, seed)
  chosen = ([content["val"][i] for i in drawn["val"]] +
            [content["train"][i] for i in drawn["train"]])
  pool, positions = splits.locate(spec, tfds_builder, split_file, chosen, cache_dir)
  missing = list(dict.fromkeys(entry[0] for entry, p in zip(chosen, positions) if p < 0))
  if missing:
    raise UserError(
        f"{len(missing)} of the images that the reference sampler chooses from split file "
        f"{split_file} ({shots} shots, seed {seed}) are not in TFDS {spec.tfds_name}: "
        f"{_named(missing)}; without them the reference's few-shot set cannot be reproduced "
        f"(is this the split file of {spec.name}, and TFDS prepared from the same images?)")
  _warn_reference_shortages(labels, shots, spec.class_names)
  cut = len(drawn["val"])
  return Choice(pool.subset(positions[cut:]), pool.subset(positions[:cut]), REFERENCE)


def _reference_lists(spec: DatasetSpec, shots: int, seed: int, data_dir: str | None,
                     cache_dir: str | None) -> Choice:
  """The reference's draw from the official lists, which TFDS keeps in file order."""
  pools = {role: splits.benchmark_split(spec, role, data_dir, None, cache_dir)
           for role in ("val", "train")}
  labels = {role: pool.label for role, pool in pools.items()}
  drawn = _reference_val_then_train(labels, shots, seed)
  _warn_reference_shortages(labels, shots, spec.class_names)
  train, val = (pools[role].subset(np.asarray(drawn[role], np.int64)) for role in ("train", "val"))
  return Choice(train, val, REFERENCE)


def _reference_image_folder(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder,
                            shots: int, seed: int, data_dir: str | None,
                            cache_dir: str | None) -> Choice:
  """The reference's joint draw of training and validation shots from an ImageFolder."""
  if spec.file_key is None:
    raise UserError(f"TFDS {spec.tfds_name} keeps no file names, so the reference's "
                    f"{spec.name} shots cannot be found: use sampler='numpy'")
  pool = splits.benchmark_split(spec, "train", data_dir, None, cache_dir)
  folders = np.asarray(splits.tfds_class_names(spec, tfds_builder, pool), dtype=str)
  # ImageFolder sorts Python strings; UTF-8 bytes sort in the same (code point) order.
  listed = pool.subset(np.lexsort((pool.file_name, folders)))
  need = shots + min(shots, MAX_VAL_SHOTS)
  counts = collections.Counter(listed.label.tolist())
  short = [f"{name} ({counts[label]})" for label, name in enumerate(spec.class_names)
           if counts[label] < need]
  if short:
    raise UserError(
        f"{len(short)} {spec.name} classes have fewer than the {need} training images that the "
        f"reference draws from each without replacement ({shots} shots + {need - shots} for "
        f"validation; the reference code fails there): {_named(short)}; use sampler='numpy', "
        "which fills short classes by sampling with replacement")
  rng = random.Random(seed)
  train, val = [], []
  for members in _groups(listed.label).values():
    drawn = rng.sample(members, need)
    train.extend(drawn[:shots])
    val.extend(drawn[shots:])
  return Choice(listed.subset(np.asarray(train, np.int64)),
                listed.subset(np.asarray(val, np.int64)), REFERENCE)


class _DatumUnpickler(pickle.Unpickler):
  """Unpickles CoOp's few-shot caches (dicts of lists of Dassl `Datum`), as plain attribute
  bags: a pickle naming any other class or function is refused, never run."""

  DATUM = ("dassl.data.datasets.base_dataset", "Datum")

  def find_class(self, module: str, name: str) -> type:
    if (module, name) == self.DATUM:
      return types.SimpleNamespace
    raise pickle.UnpicklingError(f"it names {module}.{name}, which a list of Dassl Datum "
                                 "objects does not hold")


def shot_list_file(directory: str, shots: int, seed: int) -> str:
  """The published list of (`shots`, `seed`) in `directory`: shot_<K>-seed_<S>.json or .pkl."""
  stem = os.path.join(directory, f"shot_{shots}-seed_{seed}")
  for path in (stem + ".json", stem + ".pkl"):
    if os.path.isfile(path):
      return path
  listed = sorted(n for n in os.listdir(directory) if n.startswith("shot_")) if os.path.isdir(
      directory) else None
  held = ("it is not a directory" if listed is None else
          f"it holds {_named(listed)}" if listed else "it holds no shot_<K>-seed_<S> file")
  raise UserError(f"shot_lists={directory!r} has no list for {shots} shots and seed {seed} "
                  f"(shot_{shots}-seed_{seed}.json or .pkl): {held}")


def read_shot_list(path: str) -> dict[str, list[list]]:
  """A published list of shots, checked: role ("train", "val") -> [[path, label, class name]]."""
  try:
    if path.endswith(".pkl"):
      with open(path, "rb") as f:
        raw = _DatumUnpickler(f).load()
      content = {role: [[vars(d).get("_impath"), vars(d).get("_label"),
                         vars(d).get("_classname")] for d in raw[role]]
                 for role in LIST_ROLES} if isinstance(raw, dict) else None
    else:
      with open(path) as f:
        content = json.load(f)
  except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as e:
    raise UserError(f"cannot read the shot list {path}: {e}") from e
  if not isinstance(content, dict) or any(
      not isinstance(content.get(role), list) or any(
          not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
          or not isinstance(entry[1], int) for entry in content[role])
      for role in LIST_ROLES):
    raise UserError(f"{path} is not a shot list: expected keys train and val, each a list of "
                    "[image path, label, class name] (or CoOp's pickle of Dassl Datum lists)")
  return content


def _listed_choice(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder, shots: int,
                   seed: int, shot_lists: str, cache_dir: str | None) -> Choice:
  """The shots a published list gives for (`shots`, `seed`), found in TFDS by path."""
  path = shot_list_file(shot_lists, shots, seed)
  content = read_shot_list(path)
  counts = collections.Counter(entry[1] for entry in content["train"])
  wrong = [f"{spec.class_names[label] if 0 <= label < spec.num_classes else label} ({count})"
           for label, count in sorted(counts.items()) if count != shots]
  if wrong or not counts:
    raise UserError(f"shot list {path} is not a {shots}-shot list: its training entries per "
                    f"class are {_named(wrong) if wrong else 'none'}")
  chosen = content["val"] + content["train"]
  pool, positions = splits.locate(spec, tfds_builder, path, chosen, cache_dir)
  missing = list(dict.fromkeys(entry[0] for entry, p in zip(chosen, positions) if p < 0))
  if missing:
    raise UserError(f"{len(missing)} of the images of shot list {path} are not in TFDS "
                    f"{spec.tfds_name}: {_named(missing)}; is this a list of {spec.name}, and "
                    "TFDS prepared from the same images?")
  cut = len(content["val"])
  return Choice(pool.subset(positions[cut:]), pool.subset(positions[:cut]), LISTS)


def choose(spec: DatasetSpec, shots: int, seed: int, data_dir: str | None = None,
           split_file: str | None = None, cache_dir: str | None = None,
           sampler: str | None = None, shot_lists: str | None = None) -> Choice:
  """The training and validation shots of `spec` for (`shots`, `seed`), by `sampler`
  (`resolve_sampler`'s default when None; `shot_lists`: the directory of published lists); see
  the module docstring."""
  if shots < 1 or seed < 0:
    raise UserError(f"few-shot {spec.name}: shots must be >= 1 and seed >= 0, got shots={shots}, "
                    f"seed={seed}")
  sampler = resolve_sampler(spec, split_file, sampler, shot_lists)
  if sampler == NUMPY:
    return _numpy_choice(spec, shots, seed, data_dir, split_file, cache_dir)
  tfds_builder = source.builder(spec, data_dir)
  if sampler == LISTS:
    return _listed_choice(spec, tfds_builder, shots, seed, shot_lists, cache_dir)
  if split_file is not None:
    return _reference_split_file(spec, tfds_builder, shots, seed, split_file, cache_dir)
  if spec.reference_order == IMAGE_FOLDER:
    return _reference_image_folder(spec, tfds_builder, shots, seed, data_dir, cache_dir)
  return _reference_lists(spec, shots, seed, data_dir, cache_dir)
