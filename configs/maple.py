"""MaPLe (clip_lora_jax/methods/maple.py) with the official recipe (vit_b16_c2_ep5_batch4_2ctx):
prompt depth 9, 2 context tokens from "a photo of a", batch 4, 5 epochs, Dassl's SGD at lr
0.0035 with one warm-up epoch (configs/prompt_learning.py). cross_dataset=True: the official
cross-dataset and domain-generalization setting, depth 3, 2 epochs, lr 0.0026. The official
code has no few-shot config.

  python train.py --config configs/maple.py:dataset=dtd,shots=16,seed=2 --workdir runs/dtd_maple
  python train.py --config configs/maple.py:dataset=imagenet,cross_dataset=True --workdir runs/in_m
"""

import ml_collections

from clip_lora_jax import config_args
from configs import prompt_learning


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots, seed (as configs/fewshot.py) and
  cross_dataset."""
  common, own = prompt_learning.split_arg(arg, ("cross_dataset",))
  cross = config_args.parse(own, cross_dataset=False).cross_dataset
  c = prompt_learning.get_config(common, "maple")
  c.maple = ml_collections.ConfigDict(dict(n_ctx=2, init="a photo of a", depth=3 if cross else 9))
  c.batch_size = 4
  c.epochs = 2 if cross else 5
  c.optimizer.learning_rate = 2.6e-3 if cross else 3.5e-3
  return c
