"""CoCoOp (clip_lora_jax/methods/cocoop.py) with the official recipe (vit_b16_c4_ep10_batch1_ctxv1):
4 context vectors from "a photo of a", batch 1, 10 epochs, Dassl's SGD at lr 0.002 with one
warm-up epoch (configs/prompt_learning.py). The official code has no few-shot config of its own;
it uses these settings for every protocol.

  python train.py --config configs/cocoop.py:dataset=dtd,shots=16,seed=2 --workdir runs/dtd_co
"""

import ml_collections

from configs import prompt_learning


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = prompt_learning.get_config(arg, "cocoop")
  c.cocoop = ml_collections.ConfigDict(dict(n_ctx=4, init="a photo of a", images_per_pass=8))
  c.batch_size = 1
  c.epochs = 10
  c.eval_batch_size = 32
  return c
