"""Files a run writes (clip_lora_jax.files): atomic, with the permissions the umask gives, and
byte-identical for equal contents."""

import os
import stat

import numpy as np
import pytest

from clip_lora_jax import files
from clip_lora_jax.errors import UserError


def test_files_get_the_permissions_the_umask_gives(tmp_path):
  old = os.umask(0o027)
  try:
    files.write_json(str(tmp_path / "a.json"), {"a": 1})
    files.write_safetensors(str(tmp_path / "a.safetensors"), {"x": np.zeros(2, np.float32)}, {})
  finally:
    os.umask(old)
  for name in ("a.json", "a.safetensors"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name


def test_equal_safetensors_contents_give_equal_bytes(tmp_path):
  tensors = {"b.a": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, np.float32)}
  keys = [f"key{i}" for i in range(12)]
  paths = []
  for order in (keys, keys[::-1]):
    path = str(tmp_path / f"{len(paths)}.safetensors")
    files.write_safetensors(path, tensors, {k: k.upper() for k in order})
    paths.append(path)
  first, second = (open(p, "rb").read() for p in paths)
  assert first == second
  read, metadata = files.read_safetensors(paths[0])
  assert metadata == {k: k.upper() for k in keys}
  np.testing.assert_array_equal(read["b.a"], tensors["b.a"])


def test_paths_that_cannot_be_written_are_named(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(UserError, match="--output .* is a directory; give a file path"):
    files.check_writable(str(tmp_path), "--output")
  with pytest.raises(UserError, match="lies below .*a_file', which is a file"):
    files.check_writable(str(a_file / "out.json"), "--output")
  files.check_writable(str(tmp_path / "new" / "out.json"), "--output")
