"""Files written whole or not at all: a temporary file beside the target, renamed onto it, with
the permissions the umask gives a new file; checks that a path can be written at all; and where
the library's caches live."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
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


def umask() -> int:
  """The process's umask (read by setting it and setting it back: POSIX has no getter)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def chmod_as_new(path: str) -> None:
  """Gives `path` the mode a plain `open()` / `mkdir()` would: 0666 (files) or 0777 (directories)
  less the umask. `mkstemp` and `mkdtemp` create 0600 / 0700, unreadable by others on shared
  storage whatever the umask says."""
  base = 0o777 if os.path.isdir(path) else 0o666
  os.chmod(path, base & ~umask())


def check_writable(path: str, what: str, directory: bool = False) -> None:
  """Raises a UserError when `path` cannot be created or replaced as a file (or, with
  `directory`, used as a directory): it exists as the other kind, or lies below a file."""
  path = os.path.abspath(path)
  if os.path.exists(path) and os.path.isdir(path) != directory:
    kind = "a directory" if os.path.isdir(path) else "a file"
    raise UserError(f"{what} {path!r} is {kind}; give a {'directory' if directory else 'file'} "
                    "path")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{what} {path!r} lies below {parent!r}, which is a file, not a directory")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path in `path`'s directory; renamed onto `path` if the block succeeds,
  removed if it fails, so readers (and resumed runs) never see half a file. The file gets the
  mode the umask gives new files."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    chmod_as_new(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_new_directory(directory: str, what: str) -> None:
  """Raises a UserError unless `directory` is absent or an empty directory (what
  `atomic_directory` may write), so that nothing a user has is replaced."""
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise UserError(f"{what}: {directory!r} already exists and is not an empty directory; choose "
                    "a new path or remove it first.")


@contextlib.contextmanager
def atomic_directory(directory: str, what: str) -> Iterator[str]:
  """Yields a temporary sibling of `directory` to fill; renamed onto `directory` if the block
  succeeds, removed if it fails, so `directory` is never seen half-written. It and everything in
  it get the modes the umask gives new files and directories (`mkdtemp` makes 0700, safetensors
  writes 0600). `directory` must be absent or empty (`check_new_directory`, `what` names the
  writer in its error)."""
  check_new_directory(directory, what)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.", dir=parent)
  try:
    yield tmp
    for root, dirs, names in os.walk(tmp):
      for name in dirs + names:
        chmod_as_new(os.path.join(root, name))
    chmod_as_new(tmp)
    if os.path.isdir(directory):
      os.rmdir(directory)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON with sorted keys, atomically."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
  """A safetensors file's bytes with its header's keys sorted.

  safetensors serialises the metadata from a hash map, in an order that changes from process to
  process; sorting the header makes equal tensors and metadata give equal bytes. The data offsets
  count from the end of the header, so they stay valid; the header is padded with spaces to a
  multiple of 8 bytes, as safetensors does.
  """
  raw = safetensors.numpy.save(tensors, metadata=metadata)
  (length,) = struct.unpack("<Q", raw[:8])
  header = json.dumps(json.loads(raw[8:8 + length]), sort_keys=True, separators=(",", ":"))
  header_bytes = header.encode()
  header_bytes += b" " * (-len(header_bytes) % 8)
  return struct.pack("<Q", len(header_bytes)) + header_bytes + raw[8 + length:]


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """A safetensors file with string metadata, atomically, byte-identical for equal contents."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(safetensors_bytes(tensors, metadata))


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
