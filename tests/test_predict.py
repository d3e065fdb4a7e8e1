"""predict.py and clip_lora_jax.inference on generated images: the output's schema, top-1 equal
to the argmax of `methods.logits_fn` (eval.py's scoring) on the same preprocessed images, and
one-line errors for bad input."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clip_lora_jax import base as base_lib
from clip_lora_jax import data, evaluation, inference, methods
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import feature_cache, zero_shot
from configs import runlocal

from conftest import ENV, ROOT

IMAGE_SIZES = ((40, 50), (64, 32), (33, 33))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
  """Random RGB PNGs of several sizes, and a grayscale JPEG in a subfolder."""
  directory = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate(IMAGE_SIZES):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(directory / f"im{i}.png")
  (directory / "sub").mkdir()
  Image.fromarray(rng.integers(0, 256, (20, 30), np.uint8)).save(directory / "sub" / "gray.jpg")
  return str(directory)


@pytest.fixture(scope="module")
def base():
  config = runlocal.get_config()
  return base_lib.load_base_model(config.model, config.random_init, config.seed)


def preprocessed(paths, size):
  """The images as eval.py's test pipeline preprocesses them (decoded here by PIL)."""
  return np.stack([data.preprocess_for_eval(np.asarray(Image.open(p).convert("RGB")), size)
                   for p in paths])


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_predict_py_json_matches_the_adapters_logits(runlocal_run, image_dir, base, tmp_path):
  workdir, _, _ = runlocal_run
  adapter_path = os.path.join(workdir, "adapter.safetensors")
  output = str(tmp_path / "preds.json")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "predict.py"), "--config",
       os.path.join(ROOT, "configs/runlocal.py"), "--adapter", adapter_path, image_dir,
       "--top_k", "3", "--batch_size", "3", "--output", output, "--progress=false"],
      env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.load(open(output))
  adapter = methods.load_adapter(adapter_path)
  names = data.get_dataset("eurosat").class_names
  assert set(result) == {"model", "adapter", "method", "classes", "templates", "top_k",
                         "predictions"}
  assert (result["model"], result["method"], result["classes"], result["templates"],
          result["top_k"]) == ("tiny", "lora", list(names), [adapter.template], 3)
  paths = sorted(os.path.join(image_dir, f"im{i}.png") for i in range(len(IMAGE_SIZES)))
  paths.append(os.path.join(image_dir, "sub", "gray.jpg"))
  assert [p["image"] for p in result["predictions"]] == paths
  # The table: a header and one row per image, each with its top-1 class and probability.
  lines = out.stdout.strip().splitlines()
  assert lines[0].split() == ["image", "top-1", "top-2", "top-3"] and len(lines) == 1 + len(paths)

  logits = np.asarray(methods.logits_fn(base, adapter, names, [adapter.template])(
      preprocessed(paths, base.config.vision.image_size)))
  expected = softmax(100.0 * logits)  # CLIP's logit scale on the LoRA family's cosines.
  for prediction, row, probs in zip(result["predictions"], logits, expected):
    top = prediction["top"]
    assert [set(e) for e in top] == [{"class", "index", "probability"}] * 3
    assert top[0]["index"] == int(np.argmax(row)) and top[0]["class"] == names[top[0]["index"]]
    assert [e["index"] for e in top] == list(np.argsort(-probs)[:3])
    np.testing.assert_allclose([e["probability"] for e in top], np.sort(probs)[::-1][:3],
                               atol=1e-5)


def test_zero_shot_on_named_classes_and_csv(image_dir, base, tmp_path):
  config = runlocal.get_config()
  result = inference.predict([os.path.join(image_dir, "*.png")], config, classes="cat, dog ,car",
                             templates=["a {} photo."], top_k=5, batch_size=2)
  assert result["classes"] == ["cat", "dog", "car"] and result["templates"] == ["a {} photo."]
  assert result["adapter"] is None and result["method"] is None
  paths = [p["image"] for p in result["predictions"]]
  assert paths == sorted(os.path.join(image_dir, f"im{i}.png") for i in range(len(IMAGE_SIZES)))
  classifier = evaluation.zero_shot_classifier(base.params, base.config, base.tokenizer,
                                               ["cat", "dog", "car"], ["a {} photo."])
  cosines = np.asarray(evaluation.clip_logits_fn(base.params, base.config, classifier)(
      preprocessed(paths, base.config.vision.image_size)))
  expected = softmax(100.0 * cosines)
  for prediction, probs in zip(result["predictions"], expected):
    assert len(prediction["top"]) == 3  # top_k capped at the class count
    np.testing.assert_allclose([probs[e["index"]] for e in prediction["top"]],
                               [e["probability"] for e in prediction["top"]], atol=1e-5)
    assert prediction["top"][0]["index"] == int(np.argmax(probs))

  output = str(tmp_path / "preds.csv")
  inference.check_output(output)
  inference.write_predictions(output, result)
  rows = list(csv.DictReader(open(output)))
  assert list(rows[0]) == ["image", "rank", "class", "index", "probability"]
  assert len(rows) == 3 * len(paths)
  first = result["predictions"][0]["top"][0]
  assert (rows[0]["image"], rows[0]["rank"], rows[0]["class"]) == (paths[0], "1", first["class"])
  assert float(rows[0]["probability"]) == pytest.approx(first["probability"], rel=1e-5)


def test_bad_inputs_are_one_line_user_errors(image_dir, base, tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = {
      lambda: inference.image_paths([]): "no images given",
      lambda: inference.image_paths([str(tmp_path / "*.jpg")]): "matches no file",
      lambda: inference.image_paths([str(tmp_path / "missing.png")]): "does not exist",
      lambda: inference.image_paths([str(empty)]): "holds no image files",
      lambda: inference.load_image(str(bad), 32): "bad.png' is not a readable image",
      lambda: inference.parse_class_list(" , "): "gives no class names",
      lambda: inference.parse_class_list("cat,dog,cat"): "repeats class names ['cat']",
      lambda: inference.read_class_file(str(tmp_path / "none.txt")): "cannot be read",
      lambda: inference.check_output(str(tmp_path / "preds.txt")): "name a .json or .csv",
      lambda: inference.build_classifier(base, None, ["cat"], ["a photo"]): "has no '{}'",
  }
  # A class-specific adapter (its classifier is in the file) refuses another class count.
  fixed = feature_cache.Adapter(
      "zero_shot", {feature_cache.FROZEN: {"classifier": np.eye(10, base.config.embed_dim)}},
      zero_shot.Config(), base.name, base.config, base.fingerprint, {"dataset": "eurosat"},
      ("a photo of a {}.",))
  cases[lambda: inference.build_classifier(base, fixed, ["cat", "dog"], ["{}"])] = (
      "2 class names are given but the 'zero_shot' adapter scores the 10 classes of eurosat")
  for call, message in cases.items():
    with pytest.raises(UserError) as error:
      call()
    assert message in str(error.value) and "\n" not in str(error.value)
  assert len(inference.predict_probabilities(
      inference.build_classifier(base, fixed, data.get_dataset("eurosat").class_names, ["{}"]),
      [os.path.join(image_dir, "im0.png")])[0]) == 10


def test_predict_py_reports_bad_input_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--classes", "a,b",
                        str(tmp_path / "*.png")], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f"error: the pattern {str(tmp_path / '*.png')!r} matches no file"]
