"""Our TFDS builders (FGVC-Aircraft, UCF-101 middle frames) on tiny copies of the official layouts,
and the `python -m clip_lora_jax.data` command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import warnings
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clip_lora_jax import data, files
from clip_lora_jax.data import __main__ as cli
from clip_lora_jax.data import sampling, source
from clip_lora_jax.data.builders import fgvc_aircraft, ucf101_frames
from clip_lora_jax.errors import UserError
from tests import reference_sampling
from conftest import ENV, ROOT

AIRCRAFT = {"train": [("0000001", "707-320"), ("0000002", "F/A-18"), ("0000003", "Cessna 172")],
            "val": [("0000004", "707-320"), ("0000005", "F/A-18")],
            "test": [("0000006", "Cessna 172"), ("0000007", "707-320")]}
UCF_TRAIN = [*(f"ApplyEyeMakeup/v_ApplyEyeMakeup_g{g:02d}_c01.avi 1" for g in range(8, 13)),
             "YoYo/v_YoYo_g08_c01.avi 101", "YoYo/v_YoYo_g09_c02.avi 101",
             "HandstandPushups/v_HandStandPushups_g08_c01.avi 37"]
UCF_TEST = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))


def jpeg(value: int, size=(12, 16)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def make_aircraft_archive(manual_dir, variants: list[str],
                          lists: dict[str, list[tuple[str, str]]] = AIRCRAFT) -> None:
  """`fgvc-aircraft-2013b.tar.gz` laid out as the official archive, with the images of `lists`
  (split -> (image id, variant) lines)."""
  files = {"variants.txt": "\n".join(variants) + "\n"}
  for split, examples in lists.items():
    files[f"images_variant_{split}.txt"] = "".join(f"{i} {v}\n" for i, v in examples)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, fgvc_aircraft.ARCHIVE), "w:gz") as archive:
    def add(name, content):
      info = tarfile.TarInfo(f"fgvc-aircraft-2013b/data/{name}")
      info.size = len(content)
      archive.addfile(info, io.BytesIO(content))
    for name, text in files.items():
      add(name, text.encode())
    for examples in lists.values():
      for image_id, _ in examples:
        add(f"images/{image_id}.jpg", jpeg(int(image_id) * 30 % 256))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  """Runs the command in-process: (exit code, stdout, stderr)."""
  try:
    cli.main(list(argv))
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def test_aircraft_builder_prepares_the_official_archive_through_the_command(tmp_path, capsys):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  make_aircraft_archive(manual, fgvc_aircraft.variant_names())
  code, out, _ = run_cli(capsys, "prepare", "fgvc_aircraft", "--data_dir", data_dir,
                         "--manual_dir", manual)
  assert code == 0
  assert "100 classes (707-320, 727-200" in out
  assert "train: 3 examples" in out and "val: 2 examples" in out and "test: 2 examples" in out

  builder = tfds.builder("fgvc_aircraft", data_dir=data_dir)
  names = builder.info.features["label"].names
  examples = list(builder.as_dataset("validation").as_numpy_iterator())
  assert sorted((e["file_name"].decode(), names[e["label"]]) for e in examples) == [
      ("0000004.jpg", "707-320"), ("0000005.jpg", "F/A-18")]
  assert examples[0]["image"].shape == (12, 16, 3)

  code, out, _ = run_cli(capsys, "info", "fgvc_aircraft", "--data_dir", data_dir)
  assert code == 0 and "train: 3 examples" in out
  spec = data.get_dataset("fgvc_aircraft")
  batch = next(data.eval_batches(spec, "test", batch_size=4, image_size=8, data_dir=data_dir))
  assert [spec.class_names[label] for label in batch["label"][:2]] in (
      ["Cessna 172", "707-320"], ["707-320", "Cessna 172"])
  assert batch["mask"].tolist() == [1, 1, 0, 0]


def test_aircraft_builder_also_takes_the_extracted_archive(tmp_path):
  manual = tmp_path / "manual"
  make_aircraft_archive(str(manual), fgvc_aircraft.variant_names())
  with tarfile.open(manual / fgvc_aircraft.ARCHIVE) as archive:
    archive.extractall(manual, filter="data")
  os.remove(manual / fgvc_aircraft.ARCHIVE)
  builder = tfds.builder("fgvc_aircraft", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  assert {s: builder.info.splits[s].num_examples for s in ("train", "validation", "test")} == {
      "train": 3, "validation": 2, "test": 2}


def shuffled_aircraft_lists() -> dict[str, list[tuple[str, str]]]:
  """Official-style lists whose order is neither by image id nor by variant: train 14 / 9 / 3
  images of three variants interleaved, val 5 / 2 / 0, test 1 / 1 / 1."""
  rng = np.random.default_rng(0)
  ids = iter(f"{i:07d}" for i in rng.choice(10**7, 40, replace=False))
  lists = {}
  for split, counts in (("train", (14, 9, 3)), ("val", (5, 2, 0)), ("test", (1, 1, 1))):
    variants = np.repeat(["Cessna 172", "707-320", "F/A-18"], counts)
    lists[split] = [(next(ids), str(v)) for v in rng.permutation(variants)]
  return lists


def test_aircraft_keeps_its_lists_order_and_the_reference_sampler_draws_from_it(tmp_path, capsys):
  lists = shuffled_aircraft_lists()
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  make_aircraft_archive(manual, fgvc_aircraft.variant_names(), lists)
  builder = tfds.builder("fgvc_aircraft", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual, num_shards=3))
  spec = data.get_dataset("fgvc_aircraft")
  for split, name in (("train", "train"), ("validation", "val")):
    names = source.catalog(spec, builder, split, None).file_names
    assert [n.decode() for n in names] == [f"{i}.jpg" for i, _ in lists[name]]

  label = {variant: i for i, variant in enumerate(spec.class_names)}
  items = {role: [(f"{i}.jpg", label[v]) for i, v in lists[role]] for role in ("train", "val")}
  for shots in (1, 2, 4, 8, 16):
    for seed in (1, 2, 3):
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short classes on purpose
        choice = sampling.choose(spec, shots, seed, data_dir)
      expected = reference_sampling.lists_draw(items["train"], items["val"], shots, seed)
      assert choice.sampler == "reference"
      assert [n.decode() for n in choice.train.file_name] == expected["train"], (shots, seed)
      assert [n.decode() for n in choice.val.file_name] == expected["val"], (shots, seed)

  code, out, _ = run_cli(capsys, "info", "fgvc_aircraft", "--data_dir", data_dir, "--shots", "2",
                         "--seed", "3", "--list")
  expected = reference_sampling.lists_draw(items["train"], items["val"], 2, 3)
  path_label = dict(items["train"] + items["val"])
  listed = [f"{role}\t{path_label[path]}\t{path}" for role in ("val", "train")
            for path in expected[role]]
  assert code == 0 and "train: 26 examples" in out
  assert ("  2-shot, seed 3: sampler reference (the reference code's choice), 6 train and 4 val "
          "images\n" + "\n".join(listed) + "\n") in out


def test_info_lists_the_numpy_choice_and_refuses_list_without_shots(tmp_path, capsys):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  make_aircraft_archive(manual, fgvc_aircraft.variant_names())
  tfds.builder("fgvc_aircraft", data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  code, out, _ = run_cli(capsys, "info", "fgvc_aircraft", "--data_dir", data_dir, "--shots", "1",
                         "--sampler", "numpy", "--list")
  lines = out.splitlines()
  assert code == 0 and "  1-shot, seed 1: sampler numpy (not the reference's choice), 3 train " \
      "and 2 val images" in lines
  assert sorted(line for line in lines if line.startswith(("val\t", "train\t"))) == [
      "train\t0\t0000001.jpg", "train\t47\t0000003.jpg", "train\t73\t0000002.jpg",
      "val\t0\t0000004.jpg", "val\t73\t0000005.jpg"]
  code, out, err = run_cli(capsys, "info", "fgvc_aircraft", "--data_dir", data_dir, "--list")
  assert code == 2 and "--seed, --sampler, --shot_lists and --list need --shots" in err
  code, out, err = run_cli(capsys, "info", "fgvc_aircraft", "--data_dir", data_dir, "--shots", "0")
  assert code == 2 and out == "" and err.startswith("error: few-shot fgvc_aircraft: shots must be")


def test_aircraft_archive_of_another_release_is_refused(tmp_path):
  manual = str(tmp_path / "manual")
  make_aircraft_archive(manual, fgvc_aircraft.variant_names()[:70])
  with pytest.raises(UserError, match="100 variants of the 2013b release"):
    tfds.builder("fgvc_aircraft", data_dir=str(tmp_path / "tfds")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))


def make_ucf_folder(manual_dir, missing: str | None = None) -> None:
  """`UCF-101-midframes/` and `ucfTrainTestlist/` as the protocol and UCF distribute them."""
  lists = os.path.join(manual_dir, ucf101_frames.LISTS)
  os.makedirs(lists)
  actions = ucf101_frames.actions()
  with open(os.path.join(lists, "classInd.txt"), "w", newline="") as f:
    f.write("".join(f"{i + 1} {a}\r\n" for i, a in enumerate(actions)))  # Windows line ends
  for name, lines in (("trainlist01.txt", UCF_TRAIN), ("testlist01.txt", UCF_TEST)):
    with open(os.path.join(lists, name), "w", newline="") as f:
      f.write("".join(f"{line}\r\n" for line in lines))
  for value, line in enumerate(UCF_TRAIN + UCF_TEST):
    action, clip = line.split()[0].split("/")
    folder = os.path.join(manual_dir, ucf101_frames.FRAMES, ucf101_frames.folder_name(action))
    os.makedirs(folder, exist_ok=True)
    if clip != missing:
      with open(os.path.join(folder, clip.replace(".avi", ".jpg")), "wb") as f:
        f.write(jpeg(value * 20))


def test_ucf_builder_prepares_middle_frames_with_official_split_lists(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  make_ucf_folder(manual)
  builder = tfds.builder("ucf101_midframes", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  assert builder.info.splits["train"].num_examples == 8
  spec = data.get_dataset("ucf101")
  test = {e["file_name"].decode(): spec.class_names[e["label"]]
          for e in builder.as_dataset("test").as_numpy_iterator()}
  assert test == {"Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg": "Apply Eye Makeup",
                  "Yo_Yo/v_YoYo_g01_c01.jpg": "Yo Yo"}
  train = {e["file_name"].decode() for e in builder.as_dataset("train").as_numpy_iterator()}
  assert "Handstand_Pushups/v_HandStandPushups_g08_c01.jpg" in train
  # The protocol carves val out of trainlist01, 80/20 per class: 1 of the 5 ApplyEyeMakeup clips.
  counts = [data.num_examples(spec, role, data_dir=data_dir) for role in ("train", "val", "test")]
  assert counts == [7, 1, 2]


def test_ucf_builder_names_a_missing_frame(tmp_path):
  manual = str(tmp_path / "manual")
  make_ucf_folder(manual, missing="v_YoYo_g09_c02.avi")
  with pytest.raises(UserError, match=r"Yo_Yo/v_YoYo_g09_c02.jpg is missing"):
    tfds.builder("ucf101_midframes", data_dir=str(tmp_path / "tfds")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))


def test_command_reports_user_errors_in_one_line_without_traceback(tmp_path, capsys):
  code, out, err = run_cli(capsys, "prepare", "stanford_cars", "--data_dir", str(tmp_path))
  assert code == 2 and "Traceback" not in err
  assert err.startswith("error: stanford_cars needs a manual download: put cars_train.tgz")
  assert os.path.join(str(tmp_path), "downloads", "manual") in err
  code, _, err = run_cli(capsys, "info", "eurosat", "--data_dir", str(tmp_path))
  assert code == 2 and "prepare eurosat --data_dir" in err and "Traceback" not in err
  code, _, err = run_cli(capsys, "info", "cifar10")
  assert code == 2 and err.startswith("error: unknown dataset 'cifar10': choose one of imagenet")
  assert "folder:/path/to/images" in err and "Traceback" not in err


def test_command_help_lists_commands_and_datasets(capsys):
  code, out, _ = run_cli(capsys, "--help")
  assert code == 0 and "prepare" in out and "info" in out and "oxford_flowers" in out


def test_prepare_without_network_fails_in_seconds_saying_what_to_download(tmp_path):
  data_dir = tmp_path / "tfds"
  offline = ("import runpy, socket, sys\n"
             "def no_network(*args, **kwargs):\n"
             "  raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')\n"
             "socket.getaddrinfo = no_network\n"
             f"sys.argv = ['data', 'prepare', 'eurosat', '--data_dir', {str(data_dir)!r}]\n"
             "runpy.run_module('clip_lora_jax.data', run_name='__main__', alter_sys=True)\n")
  env = {k: v for k, v in ENV.items() if "proxy" not in k.lower()}
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", offline], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert time.perf_counter() - start < 60  # TFDS alone retries for minutes
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("error: cannot download eurosat: madm.dfki.de cannot be reached")
  manual = os.path.join(str(data_dir), "downloads", "manual")
  assert (f"download http://madm.dfki.de/files/sentinel/EuroSAT.zip (as EuroSAT.zip) on a machine "
          f"that has it, put them into {manual}") in line
  assert f"prepare eurosat --data_dir {data_dir} --manual_dir {manual}" in line
  assert not data_dir.exists()


def test_a_failed_prepare_removes_what_it_created(tmp_path):
  kept = tmp_path / "tfds" / "kept"
  kept.mkdir(parents=True)
  root = tmp_path / "tfds"
  with pytest.raises(OSError):
    with cli.removed_on_failure([str(root), str(root / "eurosat"), str(root / "downloads")]):
      (root / "eurosat" / "rgb").mkdir(parents=True)
      (root / "downloads").mkdir()
      (root / "partial.tmp").write_text("")
      raise OSError("connection reset")
  assert sorted(os.listdir(root)) == ["kept"]
