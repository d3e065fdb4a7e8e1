"""The results store of a sweep: one JSON record per line in `ROOT/store.jsonl`, re-read
without re-running anything (`read`), and the sweep's progress in `ROOT/progress.json`.

A record describes a cell's last outcome: its identity (`key`, `kind`, `method`,
`train_dataset`, `dataset` scored, `shots`, `seed`), `status` (`DONE`, `FAILED` or
`NOT_APPLICABLE`), the test `top1` / `top5` (%) and image `count`, the `wall_s` and
`peak_rss_mb` of its process (None for a result collected from a finished workdir), the
accelerator memory peak its run or evaluation recorded (`peak_device_memory_mb`: None on CPU; a
resumed run's is its last process's), the exact
`command`, its `workdir` or output file, its `log`, `attempts` and, for failures or cells not
applicable, `reason`. Records are appended as cells end; the last one of a key wins, and a line
cut short by a crash is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from clip_lora_jax import files

STORE_FILE = "store.jsonl"
PROGRESS_FILE = "progress.json"
DONE, FAILED, NOT_APPLICABLE = "done", "failed", "not_applicable"

Record = dict[str, Any]


def path(root: str) -> str:
  return os.path.join(root, STORE_FILE)


def append(root: str, records: Iterable[Record]) -> None:
  """Appends `records` as whole lines, flushed to disk."""
  os.makedirs(root, exist_ok=True)
  text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
  with open(path(root), "a", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def read(root: str) -> dict[str, Record]:
  """key -> the last record of every cell of the store in `root` ({} when there is none)."""
  latest: dict[str, Record] = {}
  if not os.path.exists(path(root)):
    return latest
  with open(path(root), encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # A line cut short by a crash.
        continue
      latest[record["key"]] = record
  return latest


def write_progress(root: str, progress: dict[str, Any]) -> None:
  files.write_json(os.path.join(root, PROGRESS_FILE), progress)
