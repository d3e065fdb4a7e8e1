"""KgCoOp (clip_lora_jax/methods/kgcoop.py) with the official recipe: 4 context vectors from
"a photo of a", lambda 8, the Dassl SGD of configs/prompt_learning.py at lr 0.002 with batch 128
and 100 epochs (the official scripts sweep 4 shots only).

  python train.py --config configs/kgcoop.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_kg
"""

import ml_collections

from configs import prompt_learning


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = prompt_learning.get_config(arg, "kgcoop")
  c.kgcoop = ml_collections.ConfigDict(dict(n_ctx=4, init="a photo of a", lam=8.0))
  c.batch_size = 128
  c.epochs = 100
  return c
