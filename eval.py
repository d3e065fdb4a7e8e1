"""Evaluates CLIP on a benchmark split: zero-shot, with a trained adapter of any method, or a
merged checkpoint.

  # zero-shot CLIP (CoOp-protocol template of the dataset; --templates=ensemble for CLIP's 80)
  python eval.py --config configs/fewshot.py:dataset=eurosat
  # a trained adapter on its base model, with the prompt template it was trained with
  python eval.py --config configs/fewshot.py:dataset=eurosat --adapter runs/eurosat/adapter.safetensors
  # a merged model exported by train.py (config.export_merged=True), in Hugging Face layout
  python eval.py --config configs/fewshot.py:dataset=eurosat --config.model=runs/eurosat/merged
"""

import functools
import os
import sys
from collections.abc import Iterable

# pylint: disable=wrong-import-position
from clip_lora_jax import cli

cli.silence_library_noise(sys.argv)  # Before TensorFlow and transformers are imported.

from absl import app, flags
from ml_collections import config_flags

with cli.quiet_imports(sys.argv):
  import jax.numpy as jnp
  from clip_lora_jax import base as base_lib
  from clip_lora_jax import (checkpoints, data, evaluation, files, lora, methods, sharding,
                             training)
  # TensorFlow comes with TFDS: its C++ import notice is silenced here, whatever the method.
  from clip_lora_jax.data import source  # noqa: F401  pylint: disable=unused-import
from clip_lora_jax.errors import exit_on_user_error

config_flags.DEFINE_config_file(
    "config", None, "Config file naming the base model and dataset (as for train.py).",
    lock_config=True)
flags.DEFINE_string("adapter", None, "Adapter file written by train.py (adapter.safetensors).")
flags.DEFINE_string("split", "test", "Benchmark split: train, val or test.")
flags.DEFINE_enum("templates", "auto", ["auto", "config", "coop", "ensemble"],
                  "Prompts: config = config.template; coop = the dataset's template of the CoOp "
                  "protocol; ensemble = the dataset's template ensemble (CLIP's 80 for ImageNet); "
                  "auto = the template the adapter or merged model records (what it was trained "
                  "with; config.template for files that record none, or when --config.template "
                  "is given), coop for plain CLIP.")
flags.DEFINE_string("output", None, "Also write the results to this JSON file.")
flags.mark_flags_as_required(["config"])

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "fewshot.py")


def templates_for(spec: data.DatasetSpec, choice: str, template: str,
                  trained: str | None = None) -> tuple[str, ...]:
  """The prompt templates `--templates` selects; `trained`: the template the evaluated model was
  trained with, what `auto` picks (None: plain CLIP, auto picks the CoOp template)."""
  if choice == "auto":
    return (trained,) if trained else (spec.coop_template,)
  return {"config": (template,), "coop": (spec.coop_template,),
          "ensemble": tuple(spec.ensemble_templates)}[choice]


def adapter_logits_fn(spec: data.DatasetSpec, base: base_lib.BaseModel, adapter,
                      templates: tuple[str, ...]):
  """images -> the adapter's scores over the classes of `spec`. A dataset whose classes are
  classes of the adapter's training dataset (ImageNet-A's 200 of ImageNet's 1000) is scored
  through those columns of the adapter's scores over that dataset's classes, so that a head
  trained for those classes (a feature-cache method's) applies; for a text classifier this
  equals scoring the subset's class names."""
  subset = spec.subset_of
  if subset is None or (adapter.few_shot or {}).get("dataset") != subset.dataset:
    return methods.logits_fn(base, adapter, spec.class_names, templates)
  scores = methods.logits_fn(base, adapter, data.get_dataset(subset.dataset).class_names,
                             templates)
  columns = jnp.asarray(subset.ids)
  return lambda images: scores(images)[:, columns]


def evaluate(config, adapter_path: str | None, split: str, choice: str,
             overrides: Iterable[str] = ()) -> dict:
  """Top-1 / top-5 of the (adapted) base model on `split` of the config's dataset. `overrides`:
  the config keys the command line sets, which must not contradict the adapter."""
  overrides = set(overrides)
  spec = data.get_dataset(config.dataset, config.get("class_names_file"))
  adapter = methods.load_adapter(adapter_path) if adapter_path else None
  if adapter is not None:
    methods.check_overrides(adapter, config, overrides)
  base = base_lib.load_base_model(config.model, config.random_init, config.seed)
  if adapter is not None:
    lora.check_compatible(adapter, base.name, base.config, base.fingerprint)
  if "template" in overrides:
    trained = config.template
  elif adapter is not None:
    trained = adapter.template or config.template
  else:
    trained = checkpoints.recorded_template(config.model) if os.path.isdir(config.model) else None
  templates = templates_for(spec, choice, config.template, trained)
  with training.data_context(config):
    if adapter is None:
      classifier = evaluation.zero_shot_classifier(base.params, base.config, base.tokenizer,
                                                   spec.class_names, templates)
      logits_fn = evaluation.clip_logits_fn(base.params, base.config, classifier)
    else:
      logits_fn = adapter_logits_fn(spec, base, adapter, templates)
    image_size = base.config.vision.image_size
    batches = data.eval_batches(spec, split, batch_size=config.eval_batch_size,
                                image_size=image_size, data_dir=config.data_dir,
                                split_file=config.split_file)
    total = data.num_examples(spec, split, data_dir=config.data_dir, split_file=config.split_file)
    result = evaluation.evaluate(logits_fn, batches, total, config.progress)
  return {"dataset": spec.name, "split": split, "model": base.name, "adapter": adapter_path,
          "templates": list(templates), **result,
          "peak_device_memory_mb": sharding.peak_device_memory_mb()}


def main(argv):
  f = cli.start(argv)
  with exit_on_user_error():
    if f.output:
      files.check_writable(f.output, "--output")
    result = evaluate(f.config, f.adapter, f.split, f.templates,
                      config_flags.get_override_values(flags.FLAGS["config"]))
  print(f"{result['dataset']} {result['split']}: top-1 {result['top1']:.2f}%  "
        f"top-5 {result['top5']:.2f}%  ({result['count']} images)")
  if f.output:
    files.write_json(f.output, result)


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags_or_exit,
                                               default_config=DEFAULT_CONFIG))
