"""The paper's tables from a sweep's store, in Markdown and LaTeX: Table 2 of CLIP-LoRA (rows
shots x method, columns the datasets and their average, mean over seeds, optionally with the
standard deviation), base-to-novel, cross-dataset and domain-shift. In each column the best
value is bold and the second best underlined.

Means are over the seeds a cell has; the average of a row is the mean over its datasets of those
means (its deviation: that of the per-seed averages over datasets), shown only when the row has
every dataset of the table. Base-to-novel's harmonic mean H = 2BN / (B + N) is of the seed
means; its average row is H of the mean base and mean novel (CoCoOp's).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
from collections.abc import Iterable, Sequence

from clip_lora_jax import files

from clip_lora_jax.data import registry
from clip_lora_jax.sweep import store

# The paper's column order and names.
PAPER_ORDER = ("imagenet", "sun397", "fgvc_aircraft", "eurosat", "stanford_cars", "food101",
               "oxford_pets", "oxford_flowers", "caltech101", "dtd", "ucf101")
TITLES = {"imagenet": "ImageNet", "sun397": "SUN397", "fgvc_aircraft": "Aircraft",
          "eurosat": "EuroSAT", "stanford_cars": "Cars", "food101": "Food101",
          "oxford_pets": "Pets", "oxford_flowers": "Flowers", "caltech101": "Caltech101",
          "dtd": "DTD", "ucf101": "UCF101", "imagenet_v2": "-V2", "imagenet_sketch": "-Sketch",
          "imagenet_a": "-A", "imagenet_r": "-R"}
# Registry method -> its row in the published CLIP-LoRA Table 2 (clip_lora_jax/assets).
PUBLISHED_NAMES = {"lora": "CLIP-LoRA (Ours)", "zero_shot": "CLIP (ICML '21)",
                   "tip_adapter_f": "TIP-Adapter-F (ECCV '22)",
                   "clip_adapter": "CLIP-Adapter (IJCV '23)", "taskres": "TaskRes (CVPR '23)",
                   "coop": "CoOp (16) (IJCV '22)", "cocoop": "CoCoOp (CVPR '22)",
                   "kgcoop": "KgCoOp (CVPR '23)", "maple": "MaPLe (CVPR '23)",
                   "prograd": "ProGrad (ICCV '23)", "plot": "PLOT++ (ICLR '23)"}
AVERAGE = "Average"

Value = tuple[float, float | None] | None  # (mean, std over seeds; None for one seed), None: missing.


@dataclasses.dataclass(frozen=True)
class Table:
  """A table: `labels` leading label columns, then value columns; in each group of rows, the
  best value of a column is marked bold and the second best underlined."""
  name: str
  header: tuple[str, ...]
  labels: int
  groups: tuple[tuple[tuple[tuple[str, ...], tuple[Value, ...]], ...], ...]


def _mean_std(values: Sequence[float]) -> Value:
  if not values:
    return None
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _by_seed(records: Iterable[store.Record]) -> dict[tuple, dict[int, float]]:
  """(method, train_dataset, dataset, shots) -> seed -> top-1 of the finished cells."""
  values: dict[tuple, dict[int, float]] = collections.defaultdict(dict)
  for r in records:
    if r["status"] == store.DONE:
      values[r["method"], r["train_dataset"], r["dataset"], r["shots"]][r["seed"]] = r["top1"]
  return values


def seed_row(per_dataset: Sequence[dict[int, float]], average: bool) -> tuple[Value, ...]:
  """Seed means of each column, and with `average` their mean (its deviation: that of the
  per-seed averages over the seeds every column has), when every column has values."""
  row = [_mean_std(list(seeds.values())) for seeds in per_dataset]
  if average:
    if all(row):
      common = set.intersection(*(set(seeds) for seeds in per_dataset))
      per_seed = [statistics.fmean(seeds[s] for seeds in per_dataset) for s in sorted(common)]
      spread = statistics.stdev(per_seed) if len(per_seed) > 1 else None
      row.append((statistics.fmean(v[0] for v in row), spread))
    else:
      row.append(None)
  return tuple(row)


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
  names = set(names)
  return [n for n in order if n in names] + sorted(names - set(order))


def _methods(records: Iterable[store.Record]) -> list[str]:
  return list(dict.fromkeys(r["method"] for r in records))


def table2(records: Sequence[store.Record]) -> Table:
  """CLIP-LoRA's Table 2: rows shots x method, columns the benchmark datasets and the average."""
  records = [r for r in records if r["kind"] == "train" and r["dataset"] in registry.DATASET_NAMES]
  values = _by_seed(records)
  datasets = _ordered({r["dataset"] for r in records}, PAPER_ORDER)
  groups = []
  for shots in sorted({r["shots"] for r in records}):
    groups.append(tuple(
        ((str(shots), method), seed_row([values.get((method, d, d, shots), {}) for d in datasets],
                                    average=True))
        for method in _methods(records)
        if any((method, d, d, shots) in values for d in datasets)))
  return Table("table2", ("Shots", "Method", *(TITLES.get(d, d) for d in datasets), AVERAGE), 2,
               tuple(groups))


def _harmonic(base: float, novel: float) -> float:
  return 2 * base * novel / (base + novel) if base + novel else 0.0


def base_to_novel(records: Sequence[store.Record]) -> Table:
  """Base, novel and their harmonic mean H per dataset and method; the average rows: the mean
  base and mean novel over the datasets, and H of those."""
  values = _by_seed(records)
  runs = sorted({(r["method"], r["train_dataset"][:-len("/base")], r["shots"]) for r in records
                 if r["kind"] == "train" and r["train_dataset"].endswith("/base")})
  datasets = _ordered({d for _, d, _ in runs}, PAPER_ORDER)
  methods = [m for m in _methods(records) if any(m == run[0] for run in runs)]
  groups, means = [], collections.defaultdict(list)
  for d in datasets:
    rows = []
    for method, shots in dict.fromkeys((m, k) for m, dd, k in runs if dd == d):
      base, novel = (_mean_std(list(values.get((method, f"{d}/base", f"{d}/{part}", shots),
                                               {}).values())) for part in ("base", "novel"))
      harmonic = (_harmonic(base[0], novel[0]), None) if base and novel else None
      rows.append(((TITLES.get(d, d), method), (base, novel, harmonic)))
      means[method].append((base, novel))
    groups.append(tuple(rows))
  average = []
  for method in methods:
    pairs = means[method]
    complete = len(pairs) == len(datasets) and all(b and n for b, n in pairs)
    b = statistics.fmean(p[0][0] for p in pairs) if complete else None
    n = statistics.fmean(p[1][0] for p in pairs) if complete else None
    average.append(((AVERAGE, method), ((b, None), (n, None), (_harmonic(b, n), None))
                    if complete else (None, None, None)))
  return Table("base_to_novel", ("Dataset", "Method", "Base", "Novel", "H"), 2,
               tuple(groups) + (tuple(average),))


def _transfer(records: Sequence[store.Record], name: str, targets: Sequence[str]) -> Table:
  """Rows source x shots x method; columns the source's own test, each target, the targets'
  average."""
  evals = [r for r in records if r["kind"] == "eval" and r["dataset"] in targets]
  values = _by_seed(records)
  used = _ordered({r["dataset"] for r in evals}, targets)
  groups = []
  for source, shots in dict.fromkeys((r["train_dataset"], r["shots"]) for r in evals):
    rows = []
    for method in _methods(r for r in evals if (r["train_dataset"], r["shots"]) == (source, shots)):
      own = _mean_std(list(values.get((method, source, source, shots), {}).values()))
      rest = seed_row([values.get((method, source, t, shots), {}) for t in used], average=True)
      rows.append(((TITLES.get(source, source), str(shots), method), (own, *rest)))
    groups.append(tuple(rows))
  return Table(name, ("Source", "Shots", "Method", "Source test", *(TITLES.get(t, t) for t in used),
                      AVERAGE), 3, tuple(groups))


def cross_dataset(records: Sequence[store.Record]) -> Table:
  """The source's adapter on the other benchmark datasets."""
  return _transfer(records, "cross_dataset", PAPER_ORDER)


def domain_shift(records: Sequence[store.Record]) -> Table:
  """The source's adapter on ImageNet-V2, -Sketch, -A and -R."""
  return _transfer(records, "domain_shift", registry.DOMAIN_SHIFT_NAMES)


def _marks(group, column: int) -> dict[int, str]:
  """Row index -> "best" / "second" in `column` of `group` (ties share a mark)."""
  means = sorted({v[0] for _, row in group if (v := row[column]) and v[0] is not None},
                 reverse=True)
  return {i: ("best" if row[column][0] == means[0] else "second")
          for i, (_, row) in enumerate(group)
          if row[column] and row[column][0] is not None and row[column][0] in means[:2]}


def _render(table: Table, std: bool, decimals: int, latex: bool) -> str:
  bold, under, pm, dash = (("\\textbf{%s}", "\\underline{%s}", " $\\pm$ ", "--") if latex
                           else ("**%s**", "<u>%s</u>", " ± ", "–"))
  lines = []
  for g, group in enumerate(table.groups):
    marks = [_marks(group, c) for c in range(len(table.header) - table.labels)]
    for i, (labels, row) in enumerate(group):
      cells = []
      for c, value in enumerate(row):
        if not value or value[0] is None:
          cells.append(dash)
          continue
        text = f"{value[0]:.{decimals}f}"
        if std and value[1] is not None:
          text += f"{pm}{value[1]:.{decimals}f}"
        mark = marks[c].get(i)
        cells.append({"best": bold, "second": under}[mark] % text if mark else text)
      lines.append((g, [*labels, *cells]))
  if latex:
    spec = "l" * table.labels + "c" * (len(table.header) - table.labels)
    body = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(table.header) + " \\\\",
            "\\midrule"]
    for n, (g, cells) in enumerate(lines):
      if n and g != lines[n - 1][0]:
        body.append("\\midrule")
      body.append(" & ".join(c.replace("_", "\\_") if "\\" not in c else c for c in cells)
                  + " \\\\")
    return "\n".join(body + ["\\bottomrule", "\\end{tabular}", ""])
  rows = ["| " + " | ".join(table.header) + " |",
          "|" + "|".join(["---"] * table.labels + ["---:"] * (len(table.header) - table.labels))
          + "|"]
  rows += ["| " + " | ".join(cells) + " |" for _, cells in lines]
  return "\n".join(rows) + "\n"


def markdown(table: Table, std: bool = False, decimals: int = 1) -> str:
  """`table` in Markdown (best **bold**, second <u>underlined</u>; `std`: mean ± std)."""
  return _render(table, std, decimals, latex=False)


def latex(table: Table, std: bool = False, decimals: int = 1) -> str:
  """`table` as a booktabs LaTeX tabular (\\textbf best, \\underline second)."""
  return _render(table, std, decimals, latex=True)


TABLES = {"table2": table2, "base_to_novel": base_to_novel, "cross_dataset": cross_dataset,
          "domain_shift": domain_shift}


def write(root: str, std: bool = False, decimals: int = 1) -> list[str]:
  """Every non-empty table of the store in `root`, into `root/tables/<name>.md` and `.tex`;
  the paths written."""
  records = list(store.read(root).values())
  written = []
  for make in TABLES.values():
    table = make(records)
    if not any(table.groups):
      continue
    for suffix, render in ((".md", markdown), (".tex", latex)):
      path = os.path.join(root, "tables", table.name + suffix)
      with files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(render(table, std, decimals))
      written.append(path)
  return written
