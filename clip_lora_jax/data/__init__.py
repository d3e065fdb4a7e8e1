"""Few-shot data of the 11 CLIP-LoRA benchmark datasets, from TFDS.

  spec = data.get_dataset("eurosat")
  few = data.load_few_shot(spec, shots=16, seed=1)
  for batch in data.train_batches(few, batch_size=32, seed=1): ...
  for batch in data.eval_batches(spec, "test"): ...   # with a "mask" for the padded last batch

Prepare a dataset (and see what a manual download needs) with
`python -m clip_lora_jax.data prepare NAME`; `python -m clip_lora_jax.data info NAME` shows it.
"""

from clip_lora_jax.data.fewshot import FewShotSet, load_few_shot
from clip_lora_jax.data.pipelines import eval_batches, few_shot_eval_batches, train_batches
from clip_lora_jax.data.preprocessing import CLIP_MEAN, CLIP_STD, preprocess_for_eval
from clip_lora_jax.data.registry import DATASET_NAMES, DEFAULT_TEMPLATE, DatasetSpec, get_dataset
from clip_lora_jax.data.sampling import SAMPLERS, resolve_sampler
from clip_lora_jax.data.splits import num_examples

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DATASET_NAMES", "DEFAULT_TEMPLATE", "DatasetSpec", "FewShotSet",
    "SAMPLERS", "eval_batches", "few_shot_eval_batches", "get_dataset", "load_few_shot",
    "num_examples", "preprocess_for_eval", "resolve_sampler", "train_batches",
]
