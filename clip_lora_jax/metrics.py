"""Metrics of a run in its workdir: `metrics.jsonl` (one JSON object per write) and TensorBoard
event files under `tensorboard/`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping


class MetricWriter:
  """Appends `{"step": s, "time": t, name: value, ...}` lines and TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._summary = None
    if enabled:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

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
