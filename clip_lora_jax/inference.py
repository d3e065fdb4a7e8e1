"""Labels your own images with zero-shot CLIP or a trained adapter of any method: the top-k
classes of each image with their probabilities (predict.py is the command line).

  from clip_lora_jax import inference
  from configs import fewshot
  result = inference.predict(["photos/", "more/*.jpg"], fewshot.get_config(),
                             adapter_path="runs/eurosat/adapter.safetensors", top_k=5)
  print(inference.format_table(result["predictions"]))

or piece by piece (`base` from `base.load_base_model`):

  classifier = inference.build_classifier(base, adapter, class_names, templates)
  probs = inference.predict_probabilities(classifier, inference.image_paths(["photos/"]))
  top = inference.top_classes(probs, classifier.class_names, k=5)

Images are preprocessed as eval.py's are (`data.preprocess_for_eval`: the shortest side resized
bicubic to the model's size, a central crop, CLIP's normalisation), and decoded by the same
TensorFlow decoder (JPEG, PNG, GIF, BMP; PIL decodes the other formats it knows, such as WebP
and TIFF). The probabilities are the softmax of the logits as the method defines them: plain
CLIP and the weight-space adapters (LoRA family) score with cosines, which get CLIP's logit
scale of 100 (what their training's cross-entropy uses); LLU and the feature-cache methods give
scaled logits of their own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from PIL import Image

from clip_lora_jax import base as base_lib
from clip_lora_jax import data, evaluation, files, lora, methods
from clip_lora_jax.data import train_input
from clip_lora_jax.errors import UserError

CLIP_LOGIT_SCALE = 100.0
# What a folder's images are recognised by (a file named on the command line may be any).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
OUTPUT_FORMATS = (".json", ".csv")
_GLOB_CHARACTERS = "*?["


def _folder_images(folder: str) -> list[str]:
  """The image files below `folder` (recursively, by extension), sorted."""
  found = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
           if name.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise UserError(f"folder {folder!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
  return sorted(found)


def image_paths(inputs: Sequence[str]) -> list[str]:
  """The image files `inputs` name, in order, each once: a file as given, a folder's image files
  (recursively, sorted), a glob pattern's matches (sorted; `**` spans folders)."""
  if not inputs:
    raise UserError("no images given: name image files, folders or glob patterns (quoted, e.g. "
                    "'photos/*.jpg')")
  paths: list[str] = []
  for item in inputs:
    if any(c in item for c in _GLOB_CHARACTERS) and not os.path.exists(item):
      matches = sorted(glob.glob(item, recursive=True))
      if not matches:
        raise UserError(f"the pattern {item!r} matches no file")
    elif not os.path.exists(item):
      raise UserError(f"image {item!r} does not exist")
    else:
      matches = [item]
    for match in matches:
      paths += _folder_images(match) if os.path.isdir(match) else [match]
  return list(dict.fromkeys(paths))


def decode_image(path: str) -> np.ndarray:
  """The uint8 (H, W, 3) RGB pixels of image file `path`; a UserError naming it if it cannot be
  read or is not an image."""
  from clip_lora_jax.data import preprocessing  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (as eval.py: TF decodes)
  try:
    with open(path, "rb") as f:
      encoded = f.read()
  except OSError as e:
    raise UserError(f"image {path!r} cannot be read: {e.strerror}") from None
  try:
    return preprocessing.decode_image(tf.constant(encoded)).numpy()
  except tf.errors.InvalidArgumentError:
    pass  # Not a format TensorFlow decodes (or damaged): PIL knows more formats.
  try:
    return train_input.decode(encoded)
  except Image.UnidentifiedImageError:
    reason = "not an image format that TensorFlow or PIL decodes"
  except Exception as e:  # PIL raises several error types for damaged files.
    reason = f"{type(e).__name__}: {e}"
  raise UserError(f"{path!r} is not a readable image ({reason}); give JPEG, PNG, GIF, BMP, WebP "
                  "or TIFF files")


def load_image(path: str, image_size: int) -> np.ndarray:
  """Image file `path` preprocessed as eval.py's test images: float32 (size, size, 3)."""
  return data.preprocess_for_eval(decode_image(path), image_size)


def image_batches(paths: Sequence[str], image_size: int, batch_size: int,
                  workers: int | None = None) -> Iterator[np.ndarray]:
  """Preprocessed (batch, size, size, 3) batches of `paths`, each padded with zero images to
  min(batch_size, len(paths)) rows (one compiled shape). Threads load the next batch while the
  current one is scored."""
  rows = min(batch_size, len(paths))
  chunks = [paths[i:i + rows] for i in range(0, len(paths), rows)]
  with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    load = lambda chunk: [pool.submit(load_image, p, image_size) for p in chunk]
    pending = load(chunks[0]) if chunks else []
    for i in range(len(chunks)):
      images = [future.result() for future in pending]
      pending = load(chunks[i + 1]) if i + 1 < len(chunks) else []
      batch = np.zeros((rows, image_size, image_size, 3), np.float32)
      batch[:len(images)] = images
      yield batch


def parse_class_list(text: str, where: str = "--classes") -> tuple[str, ...]:
  """Comma-separated class names, stripped; a UserError if none is given or one repeats."""
  return check_class_names([name.strip() for name in text.split(",") if name.strip()], where)


def read_class_file(path: str) -> tuple[str, ...]:
  """One class name per line (blank lines skipped)."""
  try:
    with open(path, encoding="utf-8") as f:
      names = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"class names file {path!r} cannot be read: {e}") from None
  return check_class_names(names, f"class names file {path!r}")


def check_class_names(names: Sequence[str], where: str) -> tuple[str, ...]:
  """`names` as a tuple; a UserError if there are none or one repeats (its score would be
  ambiguous)."""
  if not names:
    raise UserError(f"{where} gives no class names")
  repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
  if repeated:
    raise UserError(f"{where} repeats class names {repeated}; give each class once")
  return tuple(names)


def adapter_class_names(adapter: Any) -> tuple[str, ...]:
  """The class names of the task `adapter` was trained on: its dataset's, from the registry."""
  dataset = (adapter.few_shot or {}).get("dataset")
  if dataset is None:
    raise UserError("the adapter file does not record the dataset it was trained on: give the "
                    "class names with --classes or --classes_file")
  return data.get_dataset(dataset).class_names


def fixed_class_count(base: base_lib.BaseModel, adapter: Any) -> int | None:
  """How many classes an adapter with its own classifier (a feature-cache method's) scores; None
  when it scores any class names (their embeddings come from the text tower)."""
  # Imported on use: it brings TensorFlow, which a command failing on its arguments never needs.
  from clip_lora_jax.methods import feature_cache  # pylint: disable=import-outside-toplevel
  if isinstance(adapter, feature_cache.Adapter):
    return feature_cache.num_classes(base, adapter)
  return None


def logit_scale(adapter: Any) -> float:
  """The factor turning `logits_fn`'s scores into the logits the softmax takes: CLIP's 100 for
  cosines (plain CLIP, weight-space adapters), 1 for methods whose logits are scaled already."""
  return CLIP_LOGIT_SCALE if adapter is None or isinstance(adapter, lora.Adapter) else 1.0


@dataclasses.dataclass(frozen=True)
class Classifier:
  """images -> class scores (`logits_fn`), the softmax's `scale`, the class names and the image
  size the base model takes."""
  logits_fn: Callable[[jax.Array], jax.Array]
  scale: float
  class_names: tuple[str, ...]
  image_size: int


def build_classifier(base: base_lib.BaseModel, adapter: Any, class_names: Sequence[str],
                     templates: Sequence[str]) -> Classifier:
  """The classifier of `base` with `adapter` (any method's; None: zero-shot CLIP) over
  `class_names`, the class embeddings made with `templates`."""
  class_names = check_class_names(class_names, "the class list")
  for template in templates:
    if "{}" not in template:
      raise UserError(f"template {template!r} has no '{{}}' for the class name")
  if adapter is None:
    classifier = evaluation.zero_shot_classifier(base.params, base.config, base.tokenizer,
                                                 class_names, templates)
    logits_fn = evaluation.clip_logits_fn(base.params, base.config, classifier)
  else:
    lora.check_compatible(adapter, base.name, base.config, base.fingerprint)
    count = fixed_class_count(base, adapter)
    if count is not None and count != len(class_names):
      dataset = (adapter.few_shot or {}).get("dataset", "its training data")
      raise UserError(f"{len(class_names)} class names are given but the {adapter.method!r} "
                      f"adapter scores the {count} classes of {dataset} (its classifier is in "
                      "the file): drop --classes / --classes_file, or give those classes")
    logits_fn = methods.logits_fn(base, adapter, class_names, templates)
  return Classifier(logits_fn, logit_scale(adapter), class_names, base.config.vision.image_size)


@jax.jit
def _softmax(logits: jax.Array, scale: float) -> jax.Array:
  return jax.nn.softmax(scale * logits.astype(jnp.float32), axis=-1)


def predict_probabilities(classifier: Classifier, paths: Sequence[str], batch_size: int = 32,
                          progress: bool = False) -> np.ndarray:
  """(images, classes) float32 class probabilities of the image files `paths`."""
  out, done = [], 0
  with tqdm.tqdm(total=len(paths), desc="predict", unit="img", disable=not progress,
                 dynamic_ncols=True) as bar:
    for batch in image_batches(paths, classifier.image_size, batch_size):
      count = min(len(batch), len(paths) - done)  # The rest of the last batch is padding.
      out.append(np.asarray(_softmax(classifier.logits_fn(batch), classifier.scale))[:count])
      done += count
      bar.update(count)
  return np.concatenate(out) if out else np.zeros((0, len(classifier.class_names)), np.float32)


def top_classes(probabilities: np.ndarray, class_names: Sequence[str],
                k: int) -> list[list[dict[str, Any]]]:
  """Per image, its k most probable classes, most probable first: {"class", "index",
  "probability"} (k is capped at the class count)."""
  order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
  return [[{"class": class_names[i], "index": int(i), "probability": float(row[i])}
           for i in top] for row, top in zip(probabilities, order)]


def check_output(path: str) -> None:
  """A UserError unless `path` ends in .json or .csv and can be written."""
  if os.path.splitext(path)[1].lower() not in OUTPUT_FORMATS:
    raise UserError(f"--output {path!r}: name a .json or .csv file")
  files.check_writable(path, "--output")


def write_predictions(path: str, result: dict[str, Any]) -> None:
  """`result` (with "predictions": [{"image", "top": [...]}]) atomically as JSON, or as CSV
  with one row per image and rank: image, rank, class, index, probability."""
  if os.path.splitext(path)[1].lower() == ".json":
    files.write_json(path, result)
    return
  with files.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "rank", "class", "index", "probability"])
    for prediction in result["predictions"]:
      for rank, entry in enumerate(prediction["top"], 1):
        writer.writerow([prediction["image"], rank, entry["class"], entry["index"],
                         f"{entry['probability']:.6g}"])


def format_table(predictions: Sequence[dict[str, Any]]) -> str:
  """The predictions as an aligned text table: the image, then each rank's class and
  probability."""
  ranks = max((len(p["top"]) for p in predictions), default=0)
  header = ["image"] + [f"top-{r + 1}" for r in range(ranks)]
  rows = [[p["image"]] + [f"{e['class']} {100 * e['probability']:.1f}%" for e in p["top"]]
          for p in predictions]
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                   for row in [header, *rows])


def class_names_for(classes: str | None, classes_file: str | None, adapter: Any,
                    config: ml_collections.ConfigDict, config_given: bool) -> tuple[str, ...]:
  """The class names to score: the command line's, else the adapter's task's, else the
  explicitly given config's dataset's."""
  if classes is not None and classes_file is not None:
    raise UserError("give the class names once: --classes or --classes_file, not both")
  if classes is not None:
    return parse_class_list(classes)
  if classes_file is not None:
    return read_class_file(classes_file)
  if adapter is not None:
    return adapter_class_names(adapter)
  if config_given:
    return data.get_dataset(config.dataset).class_names
  raise UserError("no classes to score: give --classes \"cat,dog\", --classes_file, an "
                  "--adapter (its task's classes) or a --config naming a dataset")


def templates_for(flag: Sequence[str] | None, adapter: Any, config: ml_collections.ConfigDict,
                  overrides: set[str]) -> tuple[str, ...]:
  """--template, else --config.template when given, else the adapter's recorded template(s),
  else config.template."""
  if flag:
    return tuple(flag)
  recorded = getattr(adapter, "templates", None) or (
      (adapter.template,) if getattr(adapter, "template", None) else ())
  if recorded and "template" not in overrides:
    return tuple(recorded)
  return (config.template,)


def predict(images: Sequence[str], config: ml_collections.ConfigDict,
            adapter_path: str | None = None, model: str | None = None, classes: str | None = None,
            classes_file: str | None = None, templates: Sequence[str] | None = None,
            top_k: int = 5, batch_size: int = 32, progress: bool = False,
            config_given: bool = True, overrides: Iterable[str] = ()) -> dict[str, Any]:
  """The top-k predictions of every image `images` names, with what produced them (JSON-ready).
  `config_given`: whether the config names the dataset to take classes from (predict.py: --config
  or --config.dataset given). `overrides`: the config keys the command line sets, which must not
  contradict the adapter."""
  overrides = set(overrides)
  if top_k <= 0 or batch_size <= 0:
    raise UserError(f"--top_k={top_k} and --batch_size={batch_size} must be positive integers")
  paths = image_paths(images)
  adapter = methods.load_adapter(adapter_path) if adapter_path else None
  if adapter is not None:
    methods.check_overrides(adapter, config, overrides)
  class_names = class_names_for(classes, classes_file, adapter, config, config_given)
  prompts = templates_for(templates, adapter, config, overrides)
  if model is None:
    model = adapter.base_name if adapter is not None and "model" not in overrides else config.model
  base = base_lib.load_base_model(model, config.random_init, config.seed)
  classifier = build_classifier(base, adapter, class_names, prompts)
  probabilities = predict_probabilities(classifier, paths, batch_size, progress)
  tops = top_classes(probabilities, class_names, top_k)
  return {"model": base.name, "adapter": adapter_path,
          "method": adapter.method if adapter is not None else None,
          "classes": list(class_names), "templates": list(prompts), "top_k": top_k,
          "predictions": [{"image": path, "top": top} for path, top in zip(paths, tops)]}
