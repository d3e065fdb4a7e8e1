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

# pylint: disable=wrong-import-position
from clip_lora_jax import cli

cli.silence_library_noise(sys.argv)  # Before TensorFlow and transformers are imported.

from absl import app, flags
from ml_collections import config_flags

with cli.quiet_imports(sys.argv):
  from clip_lora_jax import inference
from clip_lora_jax.errors import exit_on_user_error

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


def main(argv):
  f = cli.start(argv, arguments=True)
  overrides = set(config_flags.get_override_values(flags.FLAGS["config"]))
  with exit_on_user_error():
    if f.output:
      inference.check_output(f.output)
    result = inference.predict(argv[1:], f.config, f.adapter, f.model, f.classes,
                               f.classes_file, f.template, f.top_k, f.batch_size, f.progress,
                               f["config"].present or "dataset" in overrides, overrides)
  if f.table:
    print(inference.format_table(result["predictions"]))
  if f.output:
    inference.write_predictions(f.output, result)


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags_or_exit,
                                               default_config=DEFAULT_CONFIG))
