"""Metrics of a run in its workdir: `metrics.jsonl` (one JSON object per write) and TensorBoard
event files under `tensorboard/`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from clip_lora_jax import files

FINAL_PREFIX = "test/"  # Metrics of the final test, written once the training has ended.


class MetricWriter:
  """Appends `{"step": s, "time": t, name: value, ...}` lines and TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._summary = None
    if enabled:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._path = os.path.join(workdir, "metrics.jsonl")
      self._jsonl = open(self._path, "a", encoding="utf-8")
      self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def resume_at(self, step: int) -> None:
    """Drops the `metrics.jsonl` rows a run resumed from the checkpoint of `step` writes again:
    those of later steps (written between that checkpoint and the interruption), those of the
    final test, and a line cut short by a kill. TensorBoard keeps its events as they are."""
    if not self._enabled:
      return
    self._jsonl.close()
    with open(self._path, encoding="utf-8") as f:
      lines = f.readlines()
    kept = [line for line in lines if _written_by_step(line, step)]
    if kept != lines:
      with files.atomic_path(self._path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    self._jsonl = open(self._path, "a", encoding="utf-8")

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    with self._summary.as_default(step=int(step)):
      for name, value in values.items():
        self._tf.summary.scalar(name, float(value))
    self._summary.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._summary.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _written_by_step(line: str, step: int) -> bool:
  """Whether a `metrics.jsonl` line is a whole training or validation row of a step <= `step`."""
  try:
    record = json.loads(line)
  except ValueError:
    return False
  return (line.endswith("\n") and record["step"] <= step
          and not any(k.startswith(FINAL_PREFIX) for k in record))
