"""The reference code's few-shot draw, written independently of clip_lora_jax from the procedure
as issue 17 describes it (the official CLIP-LoRA / CoOp code), with Python's global `random`
seeded once, as that code uses it: the oracle of the sampler tests.

It works on the reference's own inputs (a split file's lists, an image folder on disk), never on
TFDS, and restores the global `random` state afterwards.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections import defaultdict
from collections.abc import Iterator


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
  state = random.getstate()
  random.seed(seed)
  try:
    yield
  finally:
    random.setstate(state)


def _generate_fewshot_dataset(items: list[tuple[str, int]], num_shots: int) -> list[str]:
  """One split's shots: items grouped by label (dict of lists, first appearance), then per label
  random.sample, or random.choices when the label has fewer than num_shots items."""
  by_label: dict[int, list[tuple[str, int]]] = defaultdict(list)
  for item in items:
    by_label[item[1]].append(item)
  chosen = []
  for label_items in by_label.values():
    if len(label_items) >= num_shots:
      chosen.extend(random.sample(label_items, num_shots))
    else:
      chosen.extend(random.choices(label_items, k=num_shots))
  return [path for path, _ in chosen]


def lists_draw(train: list[tuple[str, int]], val: list[tuple[str, int]], shots: int,
               seed: int) -> dict[str, list[str]]:
  """"train" / "val" -> chosen paths, from (path, label) lists in file order: validation shots
  (min(K, 4)) first, then training shots (K)."""
  with _seeded(seed):
    val_paths = _generate_fewshot_dataset(val, min(shots, 4))
    train_paths = _generate_fewshot_dataset(train, shots)
  return {"train": train_paths, "val": val_paths}


def split_file_draw(split: dict[str, list[list]], shots: int, seed: int) -> dict[str, list[str]]:
  """The draw from a `split_zhou_<Dataset>.json` content (role -> [path, label, class name])."""
  return lists_draw([(p, int(label)) for p, label, _ in split["train"]],
                    [(p, int(label)) for p, label, _ in split["val"]], shots, seed)


def image_folder_draw(root: str, shots: int, seed: int) -> dict[str, list[str]]:
  """ImageNet's draw from the train folder `root` ("class/file" paths), read as torchvision's
  ImageFolder reads it: class folders sorted by name, files sorted within each; per label, in
  that order, random.sample(items, K + min(K, 4)): the first K train, the rest validation."""
  classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  imgs = [(f"{name}/{file}", target) for target, name in enumerate(classes)
          for file in sorted(os.listdir(os.path.join(root, name)))]
  by_label: dict[int, list[tuple[str, int]]] = defaultdict(list)
  for item in imgs:
    by_label[item[1]].append(item)
  train, val = [], []
  with _seeded(seed):
    for items in by_label.values():
      drawn = random.sample(items, shots + min(shots, 4))
      train.extend(path for path, _ in drawn[:shots])
      val.extend(path for path, _ in drawn[shots:])
  return {"train": train, "val": val}
