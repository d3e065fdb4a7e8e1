"""The whole pipeline offline on a CPU in about a minute: a tiny random-weight CLIP on mock
EuroSAT data (`tfds.testing.mock_data`). Accuracy is meaningless; everything else is real.

  python train.py --config configs/runlocal.py --workdir /tmp/runlocal
  python train.py --config configs/runlocal.py:method=block_lora --workdir /tmp/runlocal_block
  python train.py --config configs/runlocal.py:method=llu --workdir /tmp/runlocal_llu
"""

import importlib

from clip_lora_jax import config_args
from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import METHODS


def get_config(arg: str | None = None):
  """`arg`: `method=NAME`, any method of `clip_lora_jax.methods.METHODS` (default lora)."""
  args = config_args.parse(arg, method="lora")
  if args.method not in METHODS:
    raise UserError(f"method={args.method!r}: use one of {', '.join(METHODS)}")
  recipe = importlib.import_module(f"configs.{METHODS[args.method].config_file}")
  c = recipe.get_config("dataset=eurosat,shots=2,seed=1")
  c.model = "tiny"
  c.random_init = True
  c.mock_data = True
  c.total_steps = 40
  c.batch_size = 8 if args.method != "llu" else 32
  c.log_every = 5
  c.checkpoint_every = 20
  c.eval_batch_size = 16
  if "views" in c:  # feature-cache methods
    c.views = min(c.views, 2)
  if "maple" in c:  # prompts through both of the tiny model's 2 blocks
    c.maple.depth = 2
  return c
