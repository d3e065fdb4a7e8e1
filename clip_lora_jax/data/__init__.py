"""Few-shot data of the 11 CLIP-LoRA benchmark datasets, and of your own images
(`folder:/root`, `csv:/file.csv`: `user_datasets`), from TFDS.

  spec = data.get_dataset("eurosat")
  few = data.load_few_shot(spec, shots=16, seed=1)
  for batch in data.train_batches(few, batch_size=32, seed=1): ...
  for batch in data.eval_batches(spec, "test"): ...   # with a "mask" for the padded last batch

Prepare a dataset (and see what a manual download needs) with
`python -m clip_lora_jax.data prepare NAME`; `python -m clip_lora_jax.data info NAME` shows it.

Names load their module on first use: TensorFlow and TFDS, needed to read datasets, are imported
only then, and the training input (`FewShotSet`, `train_batches`) never needs them.
"""

import importlib

_MODULES = {
    "FewShotSet": "train_input", "train_batches": "train_input",
    "load_few_shot": "fewshot",
    "eval_batches": "pipelines", "few_shot_eval_batches": "pipelines",
    "preprocess_for_eval": "preprocessing", "CLIP_MEAN": "preprocessing",
    "CLIP_STD": "preprocessing",
    "DATASET_NAMES": "registry", "DEFAULT_TEMPLATE": "registry", "DatasetSpec": "registry",
    "get_dataset": "registry",
    "num_examples": "splits",
    "SAMPLERS": "sampling", "resolve_sampler": "sampling",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
  if name not in _MODULES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
