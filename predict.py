"""Labels your own images with zero-shot CLIP or a trained adapter of any method: the top-k
classes of each image with their probabilities, as a table and optionally as JSON or CSV.

  # an adapter: its task's class names, its base model and its prompt template
  python predict.py --adapter runs/eurosat/adapter.safetensors photos/ 'more/*.jpg' a.png
  # zero-shot CLIP on classes of your own, into a file
  python predict.py --model ViT-B/16 --classes "cat,dog,bird" photos/ --output preds.csv
  # the classes of a benchmark dataset (the config's), zero-shot
  python predict.py --config configs/fewshot.py:dataset=dtd photos/ --top_k 3

Images: files, folders (their image files, recursively) or glob patterns (quoted, `**` spans
folders). Class names: --classes / --classes_file, else the adapter's dataset, else the dataset
of --config when one is given. Prompts: --template, else the one the adapter was trained with,
else config.template. Base model: --model, else the adapter's, else config.model (with
config.random_init and config.seed: `--config configs/runlocal.py` for the tiny random test
model).
"""

import functools
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

# pylint: disable=wrong-import-position
from clip_lora_jax import cli

cli.silence_library_noise(sys.argv)  # Before TensorFlow and transformers are imported.

from absl import app, flags
from ml_collections import config_flags

with cli.quiet_imports(sys.argv):
  from clip_lora_jax import base as base_lib
  from clip_lora_jax import data, inference, methods
from clip_lora_jax.errors import UserError, exit_on_user_error

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "fewshot.py")

config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file: the base model (config.model, random_init, seed), "
    "the prompt template and, given explicitly, the dataset whose classes to use.",
    lock_config=True)
flags.DEFINE_string("adapter", None, "Adapter file of any method (adapter.safetensors); none: "
                    "zero-shot CLIP.")
flags.DEFINE_string("model", None, "Base model (hub id, checkpoint directory, OpenCLIP file or "
                    "architecture name); default: the adapter's, else config.model.")
flags.DEFINE_string("classes", None, "Comma-separated class names, e.g. \"cat,dog\".")
flags.DEFINE_string("classes_file", None, "File of class names, one per line.")
flags.DEFINE_multi_string("template", None, "Prompt template with {} for the class name; "
                          "repeat for an ensemble. Default: the adapter's, else config.template.")
flags.DEFINE_integer("top_k", 5, "Classes reported per image.")
flags.DEFINE_integer("batch_size", 32, "Images scored at once.")
flags.DEFINE_string("output", None, "Also write the predictions to this .json or .csv file.")
flags.DEFINE_bool("table", True, "Print the predictions as a table.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def class_names_for(classes: str | None, classes_file: str | None, adapter: Any, config,
                    config_given: bool) -> tuple[str, ...]:
  """The class names to score: the command line's, else the adapter's task's, else the
  explicitly given config's dataset's."""
  if classes is not None and classes_file is not None:
    raise UserError("give the class names once: --classes or --classes_file, not both")
  if classes is not None:
    return inference.parse_class_list(classes)
  if classes_file is not None:
    return inference.read_class_file(classes_file)
  if adapter is not None:
    return inference.adapter_class_names(adapter)
  if config_given:
    return data.get_dataset(config.dataset).class_names
  raise UserError("no classes to score: give --classes \"cat,dog\", --classes_file, an "
                  "--adapter (its task's classes) or a --config naming a dataset")


def templates_for(flag: Sequence[str] | None, adapter: Any, config,
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


def predict(images: Sequence[str], config, adapter_path: str | None = None,
            model: str | None = None, classes: str | None = None,
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
  paths = inference.image_paths(images)
  adapter = methods.load_adapter(adapter_path) if adapter_path else None
  if adapter is not None:
    methods.check_overrides(adapter, config, overrides)
  class_names = class_names_for(classes, classes_file, adapter, config, config_given)
  prompts = templates_for(templates, adapter, config, overrides)
  if model is None:
    model = adapter.base_name if adapter is not None and "model" not in overrides else config.model
  base = base_lib.load_base_model(model, config.random_init, config.seed)
  classifier = inference.build_classifier(base, adapter, class_names, prompts)
  probabilities = inference.predict_probabilities(classifier, paths, batch_size, progress)
  tops = inference.top_classes(probabilities, class_names, top_k)
  return {"model": base.name, "adapter": adapter_path,
          "method": adapter.method if adapter is not None else None,
          "classes": list(class_names), "templates": list(prompts), "top_k": top_k,
          "predictions": [{"image": path, "top": top} for path, top in zip(paths, tops)]}


def main(argv):
  f = cli.start(argv, arguments=True)
  overrides = set(config_flags.get_override_values(flags.FLAGS["config"]))
  with exit_on_user_error():
    if f.output:
      inference.check_output(f.output)
    result = predict(argv[1:], f.config, f.adapter, f.model, f.classes, f.classes_file,
                     f.template, f.top_k, f.batch_size, f.progress,
                     f["config"].present or "dataset" in overrides, overrides)
  if f.table:
    print(inference.format_table(result["predictions"]))
  if f.output:
    inference.write_predictions(f.output, result)


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags_or_exit,
                                               default_config=DEFAULT_CONFIG))
