"""The benchmark's train / val / test splits as sets of TFDS examples.

Without a split file, a benchmark split is what the registry says: whole TFDS splits, or a part
carved from them per class with a fixed seed (`carve`). With a split file of the CoOp protocol
(`split_zhou_<Dataset>.json`: keys "train", "val", "test", each a list of
[relative image path, label, class name]), every listed image is found in TFDS by its file name
and the benchmark splits are exactly the file's. Its labels must equal ours (the registry follows
the protocol's label order). A few listed images may be missing from TFDS (TFDS's SUN397 drops
two unreadable ones): up to 1% of a split is tolerated with a warning, more is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings

import numpy as np
import tensorflow_datasets as tfds

from clip_lora_jax.data import source
from clip_lora_jax.data.registry import ROLES, Carve, DatasetSpec, get_dataset
from clip_lora_jax.errors import UserError

# Seed of the per-class shuffles that carve benchmark splits out of TFDS splits.
CARVE_SEED = 0
# Largest fraction of a split file's entries that may be missing from TFDS.
MAX_MISSING = 0.01


@dataclasses.dataclass(frozen=True)
class Examples:
  """A list of TFDS examples: a benchmark split's sorted by (TFDS split, index), a few-shot
  choice's in the order drawn.

  Attributes:
    tfds_split: the TFDS split of each example.
    index: its index in that split (canonical TFDS order).
    label: its benchmark label (int32).
    file_name: its file name as TFDS keeps it (bytes, b"" if none).
  """
  tfds_split: np.ndarray
  index: np.ndarray
  label: np.ndarray
  file_name: np.ndarray

  def __len__(self) -> int:
    return len(self.index)

  @staticmethod
  def concatenate(parts: list[Examples]) -> Examples:
    return Examples(*(np.concatenate([getattr(p, f.name) for p in parts])
                      for f in dataclasses.fields(Examples)))

  def subset(self, positions: np.ndarray) -> Examples:
    return Examples(*(getattr(self, f.name)[positions] for f in dataclasses.fields(self)))

  def describe(self, position: int) -> str:
    """Where example `position` is, for messages."""
    name = self.file_name[position].decode()
    return (f"TFDS {self.tfds_split[position]} example {self.index[position]}"
            + (f" ({name})" if name else ""))


def carve(labels: np.ndarray, fractions: tuple[float, ...], part: int,
          seed: int = CARVE_SEED) -> np.ndarray:
  """Sorted positions of part `part` when every class of `labels` is shuffled and cut.

  Classes are visited in increasing label order with one generator, so each part is a pure
  function of the labels, and the parts are disjoint and cover every position.
  """
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    sizes = [round(len(members) * f) for f in fractions[:-1]]
    bounds = np.cumsum([0, *sizes, len(members) - sum(sizes)])
    chosen.append(members[bounds[part]:bounds[part + 1]])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _label_lookup(spec: DatasetSpec, num_tfds_classes: int) -> np.ndarray:
  if spec.label_map is None:
    return np.arange(num_tfds_classes, dtype=np.int32)
  return np.asarray(spec.label_map, np.int32)


def _pooled(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder, tfds_splits: tuple[str, ...],
            cache_dir: str | None) -> Examples:
  """Every example of `tfds_splits` whose class the benchmark keeps."""
  num_tfds_classes = tfds_builder.info.features[spec.label_key].num_classes
  lookup = _label_lookup(spec, num_tfds_classes)
  parts = []
  for split in tfds_splits:
    found = source.catalog(spec, tfds_builder, split, cache_dir)
    label = lookup[found.labels]
    keep = np.flatnonzero(label >= 0)
    parts.append(Examples(np.full(len(keep), split), keep, label[keep], found.file_names[keep]))
  return Examples.concatenate(parts)


def read_split_file(path: str) -> dict[str, list[list]]:
  """A `split_zhou_<Dataset>.json` file, checked: role -> [[path, label, class name], ...]."""
  try:
    with open(path) as f:
      content = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read split file {path}: {e}") from e
  if not isinstance(content, dict) or any(
      not isinstance(content.get(role), list) or
      any(not isinstance(entry, list) or len(entry) != 3 for entry in content[role])
      for role in ROLES):
    raise UserError(f"split file {path} is not a CoOp split file: expected keys "
                    f"{', '.join(ROLES)}, each a list of [relative_path, label, class_name]")
  return content


def tfds_class_names(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder,
                     examples: Examples) -> list[str]:
  """The TFDS class name (e.g. ImageNet's WordNet id, its folder name) of each of `examples`."""
  tfds_names = tfds_builder.info.features[spec.label_key].names
  inverse = {benchmark: tfds_label for tfds_label, benchmark in
             enumerate(_label_lookup(spec, len(tfds_names))) if benchmark >= 0}
  return [tfds_names[inverse[label]] for label in examples.label]


def split_file_keys(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder,
                    examples: Examples) -> list[str]:
  """The split-file path of each of `examples` ("" where TFDS keeps no file names)."""
  if spec.file_key is None:
    return [""] * len(examples)
  return [spec.split_file_key(split, name.decode(), tfds_class) for split, name, tfds_class in
          zip(examples.tfds_split, examples.file_name,
              tfds_class_names(spec, tfds_builder, examples))]


def _find(position_of: dict[str, int], path: str) -> int | None:
  """The position of `path` among TFDS's keys: the path itself, else its longest suffix of whole
  components that is a key (an absolute path on another machine, as CoOp's pickles hold)."""
  if path in position_of:
    return position_of[path]
  parts = path.replace("\\", "/").strip("/").split("/")
  for start in range(1, len(parts)):
    position = position_of.get("/".join(parts[start:]))
    if position is not None:
      return position
  return None


def locate(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder, list_file: str,
           entries: list[list], cache_dir: str | None) -> tuple[Examples, np.ndarray]:
  """Finds the entries of a split file or shot list (`list_file`) in TFDS by path (`_find`):
  (every TFDS example the benchmark keeps, the position there of each entry, -1 for one TFDS
  lacks). A found entry's label must be ours."""
  if spec.file_key is None:
    raise UserError(
        f"{list_file}: TFDS {spec.tfds_name} keeps no file names, so {spec.name} examples cannot "
        "be matched to its entries; leave split_file and shot_lists unset to use the benchmark "
        "split carved by clip_lora_jax")
  pool = _pooled(spec, tfds_builder, spec.tfds_splits, cache_dir)
  position_of = {key: i for i, key in enumerate(split_file_keys(spec, tfds_builder, pool))}
  positions = np.full(len(entries), -1, np.int64)
  for i, (path, label, class_name) in enumerate(entries):
    position = _find(position_of, path)
    if position is None:
      continue
    if int(label) != pool.label[position]:
      ours = pool.label[position]
      raise UserError(
          f"{list_file} gives {path} label {label} ({class_name}), but TFDS "
          f"{spec.tfds_name} has it in class {ours} ({spec.class_names[ours]}) of {spec.name}: "
          "is this a list of this dataset?")
    positions[i] = position
  return pool, positions


def _from_split_file(spec: DatasetSpec, tfds_builder: tfds.core.DatasetBuilder, role: str,
                     split_file: str, cache_dir: str | None) -> Examples:
  entries = read_split_file(split_file)[role]
  pool, positions = locate(spec, tfds_builder, split_file, entries, cache_dir)
  missing = [entry[0] for entry, position in zip(entries, positions) if position < 0]
  if missing:
    where = (f"{len(missing)} of the {len(entries)} {role} images of split file {split_file} "
             f"are not in TFDS {spec.tfds_name} (e.g. {', '.join(missing[:3])})")
    if len(missing) > MAX_MISSING * len(entries):
      raise UserError(f"{where}: is this the split file of {spec.name}?")
    warnings.warn(f"{where}; they are left out")
  return pool.subset(np.unique(positions[positions >= 0]))


def benchmark_split(spec: DatasetSpec, role: str, data_dir: str | None = None,
                    split_file: str | None = None, cache_dir: str | None = None) -> Examples:
  """The TFDS examples of benchmark split `role` ("train", "val" or "test") of `spec`; a class
  subset's (base / novel) are its dataset's, restricted and relabelled."""
  subset = spec.subset_of
  if subset is not None and subset.same_examples:
    examples = benchmark_split(get_dataset(subset.dataset), role, data_dir, split_file, cache_dir)
    label = subset.relabel(examples.label)
    kept = examples.subset(np.flatnonzero(label >= 0))
    return dataclasses.replace(kept, label=label[label >= 0])
  tfds_builder = source.builder(spec, data_dir)
  if split_file is not None:
    if role not in ROLES:
      raise UserError(f"unknown split {role!r}: choose one of {', '.join(ROLES)}")
    return _from_split_file(spec, tfds_builder, role, split_file, cache_dir)
  if role not in spec.splits:
    raise UserError(f"{spec.name} has no {role!r} split in the benchmark protocol: choose one "
                    f"of {', '.join(spec.splits)}")
  split_source = spec.splits[role]
  if isinstance(split_source, Carve):
    pool = _pooled(spec, tfds_builder, split_source.pool, cache_dir)
    return pool.subset(carve(pool.label, split_source.fractions, split_source.part))
  return _pooled(spec, tfds_builder, split_source, cache_dir)


def has_split(spec: DatasetSpec, role: str, split_file: str | None) -> bool:
  """Whether the benchmark (or the split file) defines split `role` for `spec`."""
  return split_file is not None or role in spec.splits


def num_examples(spec: DatasetSpec, split: str, data_dir: str | None = None,
                 split_file: str | None = None) -> int:
  """How many examples benchmark split `split` of `spec` has."""
  return len(benchmark_split(spec, split, data_dir, split_file))


def split_file_digest(split_file: str | None) -> str:
  """A digest of a split file's content ("" for none), to key caches."""
  if split_file is None:
    return ""
  with open(split_file, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
