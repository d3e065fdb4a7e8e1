"""Files written whole or not at all (a temporary file beside the target, renamed onto it), and
where the library's caches live."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from clip_lora_jax.errors import UserError

CACHE_ENV = "CLIP_LORA_JAX_CACHE"


def default_cache_dir() -> str:
  """`$CLIP_LORA_JAX_CACHE`, else `~/.cache/clip_lora_jax`: decoded data subsets, catalogs,
  frozen features and compiled programs."""
  return os.path.expanduser(os.environ.get(CACHE_ENV, "~/.cache/clip_lora_jax"))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path in `path`'s directory; renamed onto `path` if the block succeeds,
  removed if it fails, so readers (and resumed runs) never see half a file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON, atomically."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """A safetensors file with string metadata, atomically."""
  with atomic_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)


def read_safetensors(path: str, what: str = "adapter", tensors: bool = True
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a safetensors file ({} for the tensors when `tensors` is False: only
  the header is read); a UserError if it is missing or unreadable."""
  if not os.path.isfile(path):
    raise UserError(f"{what} file {path!r} does not exist")
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {},
              dict(f.metadata() or {}))
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise UserError(f"{path!r} is not a readable safetensors {what} file: {e}") from e
