"""Block-LoRA few-shot training: CLIP-LoRA's recipe (configs/fewshot.py) with the low-rank
factors cut into blocks that share one down-projection (clip_lora_jax/block_lora.py).

  python train.py --config configs/block_lora.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_block
  # the other reading of the partition (it needs rank = blocks x rank per block):
  python train.py --config configs/block_lora.py --workdir runs/eurosat_block_rank \\
      --config.lora.split=rank --config.lora.blocks=2 --config.lora.rank=4
"""

import ml_collections

from configs import fewshot


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = fewshot.get_config(arg)
  c.method = "block_lora"
  c.lora.blocks = 8  # sub-matrices sharing A_s
  c.lora.split = "input"  # "input": input chunks share A_s (rank r); "rank": rank cut in blocks
  return c
