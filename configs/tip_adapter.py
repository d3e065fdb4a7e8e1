"""Tip-Adapter, training-free (clip_lora_jax/methods/tip_adapter.py): a cache of the few-shot
embeddings added to zero-shot CLIP, its weight alpha and sharpness beta searched on the
validation shots. The official settings (github.com/gaopengcuhk/Tip-Adapter, configs/*.yaml):

  python train.py --config configs/tip_adapter.py:dataset=dtd,shots=4 --workdir runs/dtd_tip

configs/tip_adapter_f.py (Tip-Adapter-F) starts from this file.
"""

import ml_collections

from clip_lora_jax.errors import UserError
from configs import features

# dataset: (init_alpha, search_scale = (beta, alpha) upper ends of the grids); init_beta is 1
# and the grids have 200 betas and 20 alphas for every dataset.
OFFICIAL = {
    "imagenet": (1.17, (7, 3)), "caltech101": (3.0, (12, 5)), "dtd": (2.0, (13, 13)),
    "eurosat": (2.0, (12, 10)), "fgvc_aircraft": (5.0, (30, 30)), "food101": (1.17, (10, 10)),
    "oxford_flowers": (10.0, (50, 50)), "oxford_pets": (1.17, (7, 3)),
    "stanford_cars": (3.0, (20, 10)), "sun397": (1.17, (12, 10)), "ucf101": (3.0, (7, 3)),
}


def get_config(arg: str | None = None, method: str = "tip_adapter") -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, method)
  if c.dataset not in OFFICIAL:
    raise UserError(f"dataset={c.dataset!r}: Tip-Adapter has settings for {', '.join(OFFICIAL)}")
  init_alpha, (scale_beta, scale_alpha) = OFFICIAL[c.dataset]
  c.tip_adapter = ml_collections.ConfigDict(dict(
      train_keys=False, init_alpha=init_alpha, init_beta=1.0, search=True,
      search_scale=(float(scale_beta), float(scale_alpha)), search_steps=(200, 20)))
  # The dataset's CoOp template; ImageNet: the 7-template ensemble (here plus "a photo of a {}.").
  c.templates = "coop_ensemble" if c.dataset == "imagenet" else "coop"
  return c
