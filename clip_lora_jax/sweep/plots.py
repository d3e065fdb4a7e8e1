"""Accuracy-vs-shots plots from a sweep's store (matplotlib, PNG and SVG): one per dataset and
one averaged over the datasets, a line per method (mean over seeds) with a band of one standard
deviation over seeds, and the published CLIP-LoRA Table 2 numbers of the same methods as dashed
lines (`clip_lora_jax/assets/published_clip_lora_table2.csv`). Each method's line carries the
SVG id `method-NAME`, each published one `published-NAME`.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
from collections.abc import Sequence

from clip_lora_jax import files
from clip_lora_jax.sweep import store, tables

PUBLISHED_CSV = "published_clip_lora_table2.csv"


def published() -> dict[tuple[str, str], dict[int, float]]:
  """(registry method, column title, e.g. "DTD" or "Average") -> shots -> published top-1."""
  rows = importlib.resources.files("clip_lora_jax").joinpath("assets", PUBLISHED_CSV).read_text()
  by_name = {name: method for method, name in tables.PUBLISHED_NAMES.items()}
  values: dict[tuple[str, str], dict[int, float]] = {}
  for row in csv.DictReader(line for line in rows.splitlines() if not line.startswith("#")):
    method = by_name.get(row.pop("method"))
    shots = int(row.pop("shots"))
    if method:
      for title, value in row.items():
        values.setdefault((method, title), {})[shots] = float(value)
  return values


def curves(records: Sequence[store.Record]) -> dict[str, dict[str, dict[int, tables.Value]]]:
  """dataset (or "Average") -> method -> shots -> (mean, std) over seeds, of the few-shot runs;
  the average only where a method has every dataset at those shots."""
  table = tables.table2(records)
  datasets = table.header[2:-1]
  out: dict[str, dict[str, dict[int, tables.Value]]] = {}
  for group in table.groups:
    for (shots, method), row in group:
      for title, value in zip((*datasets, tables.AVERAGE), row):
        if value:
          out.setdefault(title, {}).setdefault(method, {})[int(shots)] = value
  return out


def plot(path_stem: str, title: str, lines: dict[str, dict[int, tables.Value]],
         reference: dict[str, dict[int, float]]) -> list[str]:
  """One accuracy-vs-shots figure written as `path_stem`.png and .svg; the paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, axes = plt.subplots(figsize=(4.5, 3.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for n, (method, points) in enumerate(lines.items()):
    color = colors[n % len(colors)]
    shots = sorted(points)
    means = [points[k][0] for k in shots]
    spread = [points[k][1] or 0.0 for k in shots]
    line, = axes.plot(shots, means, marker="o", color=color, label=method)
    line.set_gid(f"method-{method}")
    band = axes.fill_between(shots, [m - s for m, s in zip(means, spread)],
                             [m + s for m, s in zip(means, spread)], color=color, alpha=0.2)
    band.set_gid(f"band-{method}")
    if method in reference:
      known = {k: v for k, v in reference[method].items() if k > 0}
      if known:
        ref, = axes.plot(sorted(known), [known[k] for k in sorted(known)], "--", color=color,
                         label=f"{method} (published)")
      else:  # zero-shot: one number
        ref = axes.axhline(reference[method][0], linestyle="--", color=color,
                           label=f"{method} (published)")
      ref.set_gid(f"published-{method}")
  axes.set_xscale("log", base=2)
  every = sorted({k for points in lines.values() for k in points})
  axes.set_xticks(every, [str(k) for k in every])
  axes.set_xlabel("shots per class")
  axes.set_ylabel("top-1 accuracy (%)")
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(fontsize="small")
  figure.tight_layout()
  written = []
  for suffix in (".png", ".svg"):
    with files.atomic_path(path_stem + suffix) as tmp:
      figure.savefig(tmp, format=suffix[1:])
    written.append(path_stem + suffix)
  plt.close(figure)
  return written


def write(root: str, with_published: bool = True) -> list[str]:
  """The plots of the store in `root` into `root/plots/accuracy_vs_shots_<dataset>.{png,svg}`
  (and `_average`); the paths written."""
  reference = published() if with_published else {}
  written = []
  for title, lines in curves(list(store.read(root).values())).items():
    stem = os.path.join(root, "plots", f"accuracy_vs_shots_{title.lower()}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    written += plot(stem, title, lines, {m: reference[m, title] for m in lines
                                         if (m, title) in reference})
  return written
