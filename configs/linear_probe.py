"""Linear probe on frozen CLIP image embeddings (clip_lora_jax/methods/linear_probe.py):

  python train.py --config configs/linear_probe.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_lp
  python train.py --config configs/linear_probe.py --workdir runs/lp --config.linear_probe.c=1

The official script's values (CoOp `lpclip/linear_probe.py`): sklearn's lbfgs with 1000
iterations and tolerance 1e-4; C from the grid 1e6, 1e4, ..., 1e-6, then 8 bisection steps, on
the validation shots. Nothing trains afterwards (`epochs = 0`); the clean shots are the training
set, so one augmented view (the fewest the run accepts) is enough.
"""

import ml_collections

from clip_lora_jax.methods import linear_probe
from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "linear_probe")
  c.linear_probe = ml_collections.ConfigDict(dict(
      grid=linear_probe.GRID, search_steps=8, max_iter=1000, tol=1e-4,
      c=ml_collections.config_dict.placeholder(float)))  # None: searched on the validation shots
  c.views = 1
  return c
