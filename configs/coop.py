"""CoOp (clip_lora_jax/methods/coop.py) with the official recipe (configs/prompt_learning.py):

  python train.py --config configs/coop.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_coop
  python train.py --config configs/coop.py:dataset=dtd,shots=4,ctx=4 --workdir runs/dtd_coop4

ctx=16 (the default): 16 context vectors from N(0, 0.02); ctx=4: 4 from "a photo of a".
"""

import ml_collections

from clip_lora_jax import config_args
from configs import prompt_learning


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots, seed (as configs/fewshot.py) and ctx (16 or
  4)."""
  common, own = prompt_learning.split_arg(arg, ("ctx",))
  ctx = config_args.parse(own, ctx=16).ctx
  c = prompt_learning.get_config(common, "coop")
  c.coop = ml_collections.ConfigDict(dict(n_ctx=ctx, init="a photo of a" if ctx == 4 else ""))
  return c
