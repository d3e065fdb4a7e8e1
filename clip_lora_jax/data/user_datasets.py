"""Datasets of the user's own images: a folder of class folders, or a CSV of paths and labels.

  folder:/root    root/<class>/*.jpg, or root/{train,val,test}/<class>/*.jpg
  csv:/file.csv   columns `path` and `label`, optionally `split` (train, val or test); relative
                  paths are read from the CSV's folder

Files are JPEG, PNG, GIF or BMP images (what the input pipeline decodes), recognised by their
first bytes whatever their extension; a class folder's images may lie in sub-folders; names
starting with "." are ignored, and so are files directly in the root (or in a split folder). The
classes are the class folders (or CSV labels) in sorted order (numeric order when every CSV label
is an integer): that is the label order.

Without split folders (or split column), the registry carves the benchmark splits 50/20/30 per
class with a fixed seed out of every image (the CoOp protocol's rule for, e.g., EuroSAT); with
`train` and `test` but no `val`, validation is 20% of `train` (the rule for datasets with an
official test split). Any other set of splits is refused, and so are split folders whose classes
differ.

Every check here reads the listing and each file's first bytes, never a whole image, so that a bad
folder fails in a second, before a model is loaded. The listing becomes the config of the
`user_images` TFDS builder (`builders/user_images.py`), named by a digest of every file's path,
size and modification time, class and split.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Collection, Mapping

from clip_lora_jax.data.builders import user_images
from clip_lora_jax.errors import UserError

FOLDER = "folder:"
CSV = "csv:"
PREFIXES = (FOLDER, CSV)
# Split folder / CSV split value -> TFDS split.
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
# The sets of TFDS splits a user dataset may have (the registry maps each to benchmark roles).
ALL_IN_ONE = ("train",)
TRAIN_TEST = ("train", "test")
TRAIN_VAL_TEST = ("train", "validation", "test")
_LAYOUTS = (ALL_IN_ONE, TRAIN_TEST, TRAIN_VAL_TEST)
# First bytes of the image formats that `preprocessing.decode_image` reads.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF",
               b"GIF89a": "GIF", b"BM": "BMP"}
_HEADER_BYTES = max(map(len, _SIGNATURES))
_CSV_COLUMNS = ("path", "label")
_NAMED = 5


def is_user_dataset(name: str) -> bool:
  """Whether `name` is a `folder:` or `csv:` dataset rather than a benchmark name."""
  return name.startswith(PREFIXES)


@dataclasses.dataclass(frozen=True)
class Listing:
  """A user dataset's checked files.

  Attributes:
    name: `folder:<absolute root>` or `csv:<absolute file>`.
    classes: class folder names (or CSV labels), in label order.
    examples: TFDS split (keys in the order of one of the layouts above) -> its
      (file name as written, absolute path, label) examples, sorted by label, then file name.
  """
  name: str
  classes: tuple[str, ...]
  examples: dict[str, tuple[user_images.Example, ...]]

  @property
  def tfds_splits(self) -> tuple[str, ...]:
    return tuple(self.examples)

  def builder_config(self) -> user_images.UserImagesConfig:
    """The `user_images` config of these files, named by a digest of the listing: every file's
    path, size and modification time (ns), its class and its split."""
    entries = []
    for split, examples in self.examples.items():
      for file_name, path, label in examples:
        stat = os.stat(path)
        entries.append((split, file_name, path, self.classes[label], stat.st_size,
                        stat.st_mtime_ns))
    digest = hashlib.sha256(json.dumps([self.classes, entries]).encode()).hexdigest()[:16]
    return user_images.UserImagesConfig(name=digest, description=self.name,
                                        classes=self.classes, examples=self.examples)


def _named(items) -> str:
  items = list(items)
  more = len(items) - _NAMED
  return ", ".join(map(str, items[:_NAMED])) + (f" and {more} more" if more > 0 else "")


def _hidden(name: str) -> bool:
  return name.startswith(".")


def check_image(path: str, where: str) -> None:
  """Raises a UserError naming `path` when it cannot be read or is no image the pipeline
  decodes (by its first bytes)."""
  try:
    with open(path, "rb") as f:
      header = f.read(_HEADER_BYTES)
  except OSError as e:
    raise UserError(f"{where}: cannot read {path} ({e.strerror}); fix its permissions or remove "
                    "it") from None
  if not any(header.startswith(signature) for signature in _SIGNATURES):
    raise UserError(f"{where}: {path} is not a JPEG, PNG, GIF or BMP image; remove it (names "
                    "starting with '.' are ignored)")


def _images_below(directory: str, root: str, where: str) -> list[str]:
  """The checked images anywhere below `directory` (hidden names skipped), as sorted paths
  relative to `root` with "/" separators."""
  found = []
  for parent, folders, names in os.walk(directory):
    folders[:] = sorted(f for f in folders if not _hidden(f))
    for name in sorted(names):
      if not _hidden(name):
        path = os.path.join(parent, name)
        check_image(path, where)
        found.append(os.path.relpath(path, root).replace(os.sep, "/"))
  return sorted(found)


def _subfolders(directory: str) -> list[str]:
  return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _hidden(e.name))


def _check_classes(where: str, by_split: Mapping[str, Collection[str]],
                   names: Mapping[str, str]) -> tuple[str, ...]:
  """The classes shared by every split (`by_split`: split -> its classes; `names`: split -> how
  to call it), or a UserError naming the classes a split lacks; at least 2 of them."""
  every = sorted(set().union(*map(set, by_split.values())))
  for split, classes in by_split.items():
    lacking = [c for c in every if c not in classes]
    if lacking:
      raise UserError(f"{where}: the splits have different classes: {names[split]} lacks "
                      f"{_named(lacking)}; every split needs the same classes")
  if len(every) < 2:
    raise UserError(f"{where}: has only {len(every)} class{'' if every else 'es'} "
                    f"({_named(every) or 'none'}); classification needs at least 2 classes")
  return tuple(every)


def _layout(where: str, given: list[str], what: str) -> tuple[str, ...]:
  """The TFDS splits of the user splits `given` (train / val / test), checked."""
  splits = tuple(SPLIT_NAMES[s] for s in SPLIT_NAMES if s in given)
  if splits not in _LAYOUTS[1:]:
    raise UserError(f"{where}: {what} {', '.join(given)} only; give train and test (and "
                    "optionally val), or no splits at all for a 50/20/30 split")
  return splits


def list_folder(root: str) -> Listing:
  """The checked images of `folder:root` (see the module docstring)."""
  root = os.path.abspath(os.path.expanduser(root))
  where = f"{FOLDER}{root}"
  if not os.path.isdir(root):
    raise UserError(f"{where}: {root} is not a directory; give a folder holding one folder of "
                    "images per class")
  top = _subfolders(root)
  split_dirs = [d for d in top if d in SPLIT_NAMES]
  if split_dirs:
    others = [d for d in top if d not in SPLIT_NAMES]
    if others:
      raise UserError(f"{where}: holds split folders ({', '.join(split_dirs)}) and other folders "
                      f"({_named(others)}); put every class folder inside train/, val/ and test/")
    splits = _layout(where, split_dirs, "has split folders")
    folders = {SPLIT_NAMES[d]: os.path.join(root, d) for d in split_dirs}
  else:
    splits, folders = ALL_IN_ONE, {"train": root}
  names = {split: f"{os.path.relpath(folder, root)}/" for split, folder in folders.items()}
  classes = _check_classes(where, {s: _subfolders(folders[s]) for s in splits}, names)
  examples = {}
  for split in splits:
    found = []
    for label, cls in enumerate(classes):
      images = _images_below(os.path.join(folders[split], cls), root, where)
      if not images:
        raise UserError(f"{where}: class folder {os.path.join(folders[split], cls)} holds no "
                        "image; add images or remove it")
      found.extend((name, os.path.join(root, name), label) for name in images)
    examples[split] = tuple(found)
  return Listing(where, classes, examples)


def _label_order(labels: set[str]) -> list[str]:
  """CSV labels sorted: numerically when every one is an integer, else as text."""
  try:
    return sorted(labels, key=int)
  except ValueError:
    return sorted(labels)


def read_csv(csv_path: str) -> Listing:
  """The checked images of `csv:csv_path` (see the module docstring)."""
  csv_path = os.path.abspath(os.path.expanduser(csv_path))
  where = f"{CSV}{csv_path}"
  try:
    with open(csv_path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      columns = reader.fieldnames or []
      missing = [c for c in _CSV_COLUMNS if c not in columns]
      if missing:
        raise UserError(f"{where}: no column {', '.join(missing)} (its header is "
                        f"{','.join(columns) or 'empty'}); the first line must name the columns "
                        "path,label and optionally split")
      rows = [(reader.line_num, row) for row in reader]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{where}: cannot read {csv_path} ({e}); give a CSV file with columns "
                    "path,label and optionally split") from None
  folder = os.path.dirname(csv_path)
  entries, first_line = [], {}
  for line, row in rows:
    path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
    split = (row.get("split") or "").strip() if "split" in columns else "train"
    if not path or not label or not split:
      raise UserError(f"{where}: line {line} has an empty path, label or split")
    if split not in SPLIT_NAMES:
      raise UserError(f"{where}: line {line} has split {split!r}; use train, val or test")
    absolute = os.path.normpath(os.path.join(folder, os.path.expanduser(path)))
    if absolute in first_line:
      raise UserError(f"{where}: {absolute} is listed twice (lines {first_line[absolute]} and "
                      f"{line}); list each image once")
    first_line[absolute] = line
    if not os.path.isfile(absolute):
      raise UserError(f"{where}: line {line}: {absolute} does not exist")
    check_image(absolute, where)
    entries.append((SPLIT_NAMES[split], path, absolute, label))
  if not entries:
    raise UserError(f"{where}: lists no image")
  if "split" in columns:
    given = [s for s in SPLIT_NAMES if any(e[0] == SPLIT_NAMES[s] for e in entries)]
    splits = _layout(where, given, "has splits")
  else:
    splits = ALL_IN_ONE
  _check_classes(where, {s: {e[3] for e in entries if e[0] == s} for s in splits},
                 {s: f"split {user}" for user, s in SPLIT_NAMES.items()})
  classes = tuple(_label_order({e[3] for e in entries}))
  index = {c: i for i, c in enumerate(classes)}
  examples = {s: tuple(sorted(((path, absolute, index[label])
                               for split, path, absolute, label in entries if split == s),
                              key=lambda e: (e[2], e[0])))
              for s in splits}
  return Listing(where, classes, examples)


def listing(name: str) -> Listing:
  """The checked images of `folder:...` or `csv:...` dataset `name`."""
  if name.startswith(FOLDER):
    return list_folder(name[len(FOLDER):])
  if name.startswith(CSV):
    return read_csv(name[len(CSV):])
  raise UserError(f"dataset {name!r} is neither {FOLDER}/path nor {CSV}/path.csv")


def class_names(classes: tuple[str, ...], class_names_file: str | None) -> tuple[str, ...]:
  """The prompt name of each class: from `class_names_file`, a JSON object {class folder (or CSV
  label): name} naming every class; without it, the folder name with underscores as spaces."""
  if class_names_file is None:
    return tuple(c.replace("_", " ") for c in classes)
  try:
    with open(os.path.expanduser(class_names_file), encoding="utf-8") as f:
      mapping = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"class_names_file {class_names_file}: cannot read it as JSON ({e})") from None
  if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
    raise UserError(f"class_names_file {class_names_file}: expected a JSON object "
                    '{"class folder": "name in prompts", ...}')
  missing = [c for c in classes if c not in mapping]
  unknown = [k for k in mapping if k not in classes]
  if missing or unknown:
    problems = ([f"no name for {_named(missing)}"] if missing else []) + (
        [f"names unknown classes {_named(unknown)}"] if unknown else [])
    raise UserError(f"class_names_file {class_names_file}: {'; '.join(problems)} (the classes "
                    f"are {_named(classes)})")
  return tuple(mapping[c] for c in classes)
