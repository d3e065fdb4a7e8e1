"""The evaluation protocols of few-shot CLIP papers as grids of cells.

A cell is one ordinary run (train.py in its own workdir: a method on a dataset, shots, seed) or
one evaluation of a run's final adapter on another dataset (eval.py, changing only the class
names). The protocols (facts of the CoOp / CoCoOp protocols, see README "Sweeps"):

  fewshot        every method x dataset x shots x seed, tested on the dataset's test split;
  base_to_novel  trained on the base half of each dataset's classes (sorted label ids, base =
                 the first ceil(n / 2): dataset `D/base`), tested on base among base (the run's
                 own test) and on novel among novel (`D/novel`) with the same final adapter;
  cross_dataset  trained on the source (ImageNet), the same adapter tested on the other datasets;
  domain_shift   the same source adapter tested on ImageNet-V2, -Sketch, -A and -R (A and R
                 200-way over their own classes).

Methods whose adapter holds a head over its training classes (the feature-cache family) cannot
score other classes: their novel and cross-dataset cells are not applicable (they are reported
as such, not run); their domain-shift cells score the columns of the source's classes that the
target has. Zero-shot CLIP has nothing trained: its transfer cells evaluate plain CLIP.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from clip_lora_jax.data import registry

PROTOCOLS = ("fewshot", "base_to_novel", "cross_dataset", "domain_shift")
# Shots per protocol when the sweep names none: the few-shot grid, and the 16-shot runs that
# the generalisation protocols adapt.
DEFAULT_SHOTS = {"fewshot": (1, 2, 4, 8, 16), "base_to_novel": (16,), "cross_dataset": (16,),
                 "domain_shift": (16,)}
SOURCE = "imagenet"  # The training dataset of cross-dataset and domain-shift transfer.
# The method whose adapter is plain CLIP's classifier: its transfer cells evaluate plain CLIP.
PLAIN_CLIP = "zero_shot"
# How an evaluation cell scores: with the run's adapter, or plain CLIP (no adapter).
ADAPTER, PLAIN = "adapter", "plain"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell: the run of `method` on `train_dataset` with `shots` and `seed`; with `target`,
  the evaluation of that run's adapter on dataset `target` instead."""
  method: str
  train_dataset: str
  shots: int
  seed: int
  target: str | None = None

  @property
  def kind(self) -> str:
    return "train" if self.target is None else "eval"

  @property
  def dataset(self) -> str:
    """The dataset whose test split the cell scores."""
    return self.target or self.train_dataset

  @property
  def run(self) -> Cell:
    """The training cell this cell evaluates (itself for a training cell)."""
    return dataclasses.replace(self, target=None)

  @property
  def key(self) -> str:
    """A unique name, also the cell's path under the sweep root."""
    key = f"{self.method}/{self.train_dataset.replace('/', '-')}/{self.shots}shot_seed{self.seed}"
    return key if self.target is None else f"{key}/on_{self.target.replace('/', '-')}"


def class_specific(method: str) -> bool:
  """Whether `method`'s adapter holds a head over its training classes (a feature-cache
  method's), so that it cannot score other classes."""
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel  (JAX: on use)
  from clip_lora_jax.methods import feature_cache  # pylint: disable=import-outside-toplevel
  return getattr(methods.get(method), "train_and_evaluate", None) is feature_cache.run


def scoring(cell: Cell) -> str | None:
  """How evaluation cell `cell` scores (`ADAPTER` or `PLAIN`), None when it cannot: a
  class-specific head on classes that are not columns of its training classes."""
  if cell.method == PLAIN_CLIP:
    return PLAIN
  if not class_specific(cell.method):
    return ADAPTER
  subset = registry.get_dataset(cell.target).subset_of
  columns = subset is not None and not subset.same_examples and subset.dataset == cell.train_dataset
  return ADAPTER if columns else None


def grid(protocol: str, method_names: Sequence[str], datasets: Sequence[str],
         shots: Sequence[int], seeds: Sequence[int], source: str = SOURCE,
         targets: Sequence[str] = ()) -> list[Cell]:
  """The cells of `protocol` over `datasets` (benchmarks). The transfer protocols train on
  `source`; cross_dataset tests on the other `datasets`, domain_shift on `targets` (default
  `registry.DOMAIN_SHIFT_NAMES`). Training cells come before the cells that evaluate them."""
  if protocol == "fewshot":
    return [Cell(*run) for run in itertools.product(method_names, datasets, shots, seeds)]
  if protocol == "base_to_novel":
    cells = [Cell(m, f"{d}/base", k, s)
             for m, d, k, s in itertools.product(method_names, datasets, shots, seeds)]
    return cells + [dataclasses.replace(c, target=c.train_dataset[:-len("base")] + "novel")
                    for c in cells]
  if protocol == "cross_dataset":
    targets = [d for d in datasets if d != source]
  else:
    targets = list(targets or registry.DOMAIN_SHIFT_NAMES)
  cells = [Cell(m, source, k, s) for m, k, s in itertools.product(method_names, shots, seeds)]
  return cells + [dataclasses.replace(c, target=t) for c in cells for t in targets]
