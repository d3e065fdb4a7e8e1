"""Zero-shot CLIP as a method (clip_lora_jax/methods/zero_shot.py): nothing trains; the result
is comparable, split for split, with every trained method's.

  python train.py --config configs/zero_shot.py:dataset=dtd --workdir runs/dtd_zero_shot
  python train.py --config configs/zero_shot.py:dataset=imagenet --workdir runs/in_zs \\
      --config.templates=clip_ensemble     # CLIP's 80 templates
"""

import ml_collections

from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "zero_shot")
  c.zero_shot = ml_collections.ConfigDict()
  c.views = 1  # Only the validation score needs features.
  return c
