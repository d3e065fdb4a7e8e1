"""ProGrad (clip_lora_jax/methods/prograd.py) with the official recipe: 16 context vectors
(zeros, then "a photo of a"), lambda 1 (0.8 for Flowers, DTD and EuroSAT at 8 and 16 shots), KL
temperature 1, and CoOp's Dassl SGD, batch 32 and epochs by shots (configs/prompt_learning.py).

  python train.py --config configs/prograd.py:dataset=dtd,shots=16,seed=2 --workdir runs/dtd_pg
"""

import ml_collections

from configs import prompt_learning

LAMBDA_08 = ("oxford_flowers", "dtd", "eurosat")  # lambda 0.8 at 8 and 16 shots


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = prompt_learning.get_config(arg, "prograd")
  lam = 0.8 if c.dataset in LAMBDA_08 and c.shots >= 8 else 1.0
  c.prograd = ml_collections.ConfigDict(dict(n_ctx=16, init="a photo of a", lam=lam,
                                             temperature=1.0))
  return c
