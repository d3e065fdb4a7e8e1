"""Datasets of your own images (`folder:` and `csv:`): train.py and eval.py end to end on a folder
of generated PNGs, the one-line errors of bad folders and CSVs, the seeded split and the CSV
variant."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clip_lora_jax import data, files, training
from clip_lora_jax.data import splits
from clip_lora_jax.errors import UserError
from configs import runlocal

from conftest import ENV, ROOT, train_cmd
from test_data_builders import run_cli
from test_train_e2e import load_eval_module, read_adapter

CLASSES = ("cat", "dog", "red_fox")
PER_CLASS = 6


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> str:
  """Each test prepares its datasets in its own cache directory (the default data_dir of user
  datasets lies there)."""
  path = str(tmp_path / "cache")
  monkeypatch.setenv(files.CACHE_ENV, path)
  return path


def write_png(path, value: int, seed: int = 0) -> None:
  """A 32x32 RGB PNG of colour `value` with some noise."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  noise = np.random.default_rng(seed).integers(0, 40, (32, 32, 3))
  pixels = np.clip(np.array([value, 255 - value, value // 2]) + noise, 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path)


def make_folder(root, classes=CLASSES, per_class=PER_CLASS, reverse=False) -> str:
  """`root/<class>/<i>.png` for every class (created in reverse order with `reverse`)."""
  items = [(label, cls, i) for label, cls in enumerate(classes) for i in range(per_class)]
  for label, cls, i in reversed(items) if reverse else items:
    write_png(os.path.join(root, cls, f"{i}.png"), 80 * label, seed=i)
  return str(root)


def benchmark_files(spec: data.DatasetSpec) -> dict[str, list[str]]:
  """Role -> the file names of that benchmark split."""
  return {role: [n.decode() for n in splits.benchmark_split(spec, role).file_name]
          for role in ("train", "val", "test")}


def test_train_and_eval_on_a_folder_of_images(tmp_path, cache_dir, capsys):
  # A folder laid out as EuroSAT's class folders, named as the benchmark names them: the
  # programs of this run are those of `runlocal_run` (mock EuroSAT: the same prompts and shapes),
  # which the test session's compilation cache then serves.
  folders = tfds.builder("eurosat/rgb").info.features["label"].names
  root = make_folder(tmp_path / "images", classes=sorted(folders), per_class=5)
  names_file = tmp_path / "names.json"
  names_file.write_text(json.dumps(dict(zip(folders, data.get_dataset("eurosat").class_names))))
  workdir = str(tmp_path / "run")
  overrides = (f"--config.dataset=folder:{root}", "--config.mock_data=False",
               f"--config.class_names_file={names_file}")
  out = subprocess.run(train_cmd(workdir, *overrides), env={**ENV, files.CACHE_ENV: cache_dir},
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"preparing folder:{root} (50 images)" in out.stderr
  results = json.load(open(os.path.join(workdir, "results.json")))
  # 50/20/30 of 5 images per class: 2 train, 1 val and 2 test images each.
  assert results["dataset"] == f"folder:{root}" and results["test_count"] == 20
  assert read_adapter(workdir).few_shot == {"dataset": f"folder:{root}", "shots": 2, "seed": 1,
                                            "sampler": "numpy"}

  # eval.py reads the same folder (prepared once, in the cache) and agrees with train.py.
  config = runlocal.get_config()
  config.update_from_flattened_dict({"dataset": f"folder:{root}", "mock_data": False,
                                     "class_names_file": str(names_file), "progress": False})
  evaluated = load_eval_module().evaluate(config, os.path.join(workdir, "adapter.safetensors"),
                                          "test", "auto")
  assert evaluated["count"] == 20 and evaluated["top1"] == pytest.approx(results["test_top1"])

  code, stdout, _ = run_cli(capsys, "info", f"folder:{root}", "--class_names_file",
                            str(names_file))
  assert code == 0
  assert "10 classes (Annual Crop Land, Forest, Herbaceous Vegetation Land, " in stdout
  assert "train: 20 examples" in stdout and "val: 10 examples" in stdout
  assert "test: 20 examples" in stdout


def test_the_seeded_split_is_stratified_and_a_pure_function_of_the_file_list(tmp_path, capsys):
  first = data.get_dataset(f"folder:{make_folder(tmp_path / 'a')}")
  # The same files elsewhere, written in the opposite order: another dataset, the same split.
  second = data.get_dataset(f"folder:{make_folder(tmp_path / 'b', reverse=True)}")
  assert first.class_names == ("cat", "dog", "red fox")
  assert first.builder_config.name != second.builder_config.name  # keyed by path too
  split = benchmark_files(first)
  assert split == benchmark_files(second)
  for role, count in (("train", 3), ("val", 1), ("test", 2)):
    assert [name.split("/")[0] for name in split[role]] == [c for c in CLASSES
                                                            for _ in range(count)]
  every = sorted(sum(split.values(), []))
  assert every == sorted(f"{c}/{i}.png" for c in CLASSES for i in range(PER_CLASS))
  # The CoOp rule, as for the benchmarks: `splits.carve` of the labels in file-name order.
  labels = np.repeat(np.arange(3), PER_CLASS)
  names = [f"{c}/{i}.png" for c in CLASSES for i in range(PER_CLASS)]
  assert split["val"] == [names[i] for i in splits.carve(labels, (0.5, 0.2, 0.3), 1)]

  # `prepare` with a data_dir prepares there, under the digest of the listing.
  code, stdout, _ = run_cli(capsys, "prepare", first.name, "--data_dir", str(tmp_path / "tfds"))
  assert code == 0 and f"prepared {first.name} in {tmp_path / 'tfds'}" in stdout
  assert "test: 6 examples" in stdout
  assert os.path.isdir(tmp_path / "tfds" / "user_images" / first.builder_config.name / "1.0.0")

  # Any change of a file (its size or modification time) is another dataset: new caches, and a
  # run config (what a workdir records and compares) that differs.
  config = runlocal.get_config()
  config.update_from_flattened_dict({"dataset": first.name, "mock_data": False})
  training.resolve(config)
  assert config.dataset_digest == first.builder_config.name
  os.utime(os.path.join(tmp_path, "a", "dog", "0.png"), ns=(0, 0))
  assert data.get_dataset(first.name).builder_config.name != first.builder_config.name


def test_split_folders_and_a_csv_with_labels_splits_and_names(tmp_path):
  root = tmp_path / "split"
  for split, count in (("train", 5), ("val", 2), ("test", 3)):
    make_folder(root / split, per_class=count)
  spec = data.get_dataset(f"folder:{root}")
  assert {role: data.num_examples(spec, role) for role in ("train", "val", "test")} == {
      "train": 15, "val": 6, "test": 9}
  assert splits.benchmark_split(spec, "val").file_name[0] == b"val/cat/0.png"

  # A CSV: paths relative to its folder (or absolute), integer labels in numeric order, a split
  # column with train and test only (validation: 20% of train), names from a JSON file.
  images = make_folder(tmp_path / "images", classes=("a", "b"), per_class=6)
  rows = ["path,label,split"] + [
      f"{'images/' if i % 2 else images + '/'}{cls}/{i}.png,{label},{'test' if i >= 4 else 'train'}"
      for cls, label in (("a", 10), ("b", 2)) for i in range(6)]
  csv_path = tmp_path / "list.csv"
  csv_path.write_text("\n".join(rows) + "\n")
  names = tmp_path / "names.json"
  names.write_text(json.dumps({"2": "bee", "10": "ant"}))
  spec = data.get_dataset(f"csv:{csv_path}", str(names))
  assert spec.class_names == ("bee", "ant") and spec.builder_config.classes == ("2", "10")
  assert {role: data.num_examples(spec, role) for role in ("train", "val", "test")} == {
      "train": 6, "val": 2, "test": 4}
  test = splits.benchmark_split(spec, "test")
  assert list(test.label) == [0, 0, 1, 1]
  assert sorted(n.decode() for n in test.file_name)[-1] == "images/b/5.png"

  # Without a split column: the 50/20/30 split of the same images, as for a folder.
  csv_path.write_text("path,label\n" + "".join(f"images/{c}/{i}.png,{c}\n" for c in ("b", "a")
                                              for i in range(6)))
  from_csv = benchmark_files(data.get_dataset(f"csv:{csv_path}"))
  from_folder = benchmark_files(data.get_dataset(f"folder:{images}"))
  assert {role: [n.removeprefix("images/") for n in names] for role, names in
          from_csv.items()} == from_folder


def _write(path, text: str = "") -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _bad_csv(tmp_path, text: str) -> str:
  make_folder(tmp_path / "images", classes=("a", "b"), per_class=2)
  _write(tmp_path / "list.csv", text)
  return f"csv:{tmp_path / 'list.csv'}"


# Name -> (makes the dataset in tmp_path and returns its name, what the error says).
BAD = {
    "missing root": (lambda t: f"folder:{t / 'nowhere'}", r"nowhere is not a directory"),
    "empty class": (lambda t: (make_folder(t / "r"), os.makedirs(t / "r" / "emu"),
                               f"folder:{t / 'r'}")[-1], r"class folder .*/r/emu holds no image"),
    "no class": (lambda t: (os.makedirs(t / "r"), f"folder:{t / 'r'}")[-1],
                 r"has only 0 classes \(none\)"),
    "single class": (lambda t: f"folder:{make_folder(t / 'r', classes=('cat',))}",
                     r"has only 1 class \(cat\); classification needs at least 2"),
    "non-image": (lambda t: (make_folder(t / "r"), _write(t / "r" / "dog" / "notes.txt", "hi"),
                             f"folder:{t / 'r'}")[-1],
                  r"/r/dog/notes\.txt is not a JPEG, PNG, GIF or BMP image"),
    "unreadable": (lambda t: (make_folder(t / "r"), os.symlink(t / "gone.png", t / "r" / "cat" / "x.png"),
                              f"folder:{t / 'r'}")[-1],
                   r"cannot read .*/r/cat/x\.png \(No such file or directory\)"),
    "split classes differ": (lambda t: (make_folder(t / "r" / "train"),
                                        make_folder(t / "r" / "test", classes=CLASSES[:2]),
                                        f"folder:{t / 'r'}")[-1],
                             r"different classes: test/ lacks red_fox"),
    "no test folder": (lambda t: (make_folder(t / "r" / "train"), make_folder(t / "r" / "val"),
                                  f"folder:{t / 'r'}")[-1],
                       r"has split folders train, val only; give train and test"),
    "splits and classes mixed": (lambda t: (make_folder(t / "r" / "train"), make_folder(t / "r"),
                                            f"folder:{t / 'r'}")[-1],
                                 r"split folders \(train\) and other folders \(cat, dog, red_fox\)"),
    "csv without label": (lambda t: _bad_csv(t, "path,class\nimages/a/0.png,a\n"),
                          r"no column label \(its header is path,class\)"),
    "csv path missing": (lambda t: _bad_csv(t, "path,label\nimages/a/0.png,a\nimages/a/9.png,a\n"),
                         r"line 3: .*/images/a/9\.png does not exist"),
    "csv bad split": (lambda t: _bad_csv(t, "path,label,split\nimages/a/0.png,a,dev\n"),
                      r"line 2 has split 'dev'; use train, val or test"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_folders_and_csvs_fail_in_one_line_before_anything_is_read(tmp_path, case):
  make, message = BAD[case]
  with pytest.raises(UserError, match=message) as e:
    data.get_dataset(make(tmp_path))
  assert "\n" not in str(e.value)


def test_bad_names_files_mock_data_and_damaged_images(tmp_path):
  root = make_folder(tmp_path / "r")
  names = tmp_path / "names.json"
  names.write_text(json.dumps({"cat": "cat", "dog": "dog", "wolf": "wolf"}))
  with pytest.raises(UserError, match=r"no name for red_fox; names unknown classes wolf"):
    data.get_dataset(f"folder:{root}", str(names))
  with pytest.raises(UserError, match=r"class_names_file applies to folder: and csv: datasets"):
    data.get_dataset("eurosat", str(names))
  # train.py's first check (before any model is loaded) lists the folder.
  config = runlocal.get_config()
  config.dataset = f"folder:{tmp_path / 'nowhere'}"
  with pytest.raises(UserError, match=r"nowhere is not a directory"):
    training.resolve(config)
  config.dataset = f"folder:{root}"
  with pytest.raises(UserError, match=r"mock_data=True would replace folder:"):
    training.resolve(config)
  # A damaged image (a PNG cut short) is found when the folder is prepared, by name.
  with open(os.path.join(root, "dog", "3.png"), "r+b") as f:
    f.truncate(60)
  with pytest.raises(UserError, match=r"cannot read image .*/r/dog/3\.png \(it does not decode\)"):
    data.num_examples(data.get_dataset(f"folder:{root}"), "test")
