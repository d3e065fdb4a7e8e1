"""GDA, Gaussian discriminant analysis on the few-shot embeddings ensembled with zero-shot CLIP
(clip_lora_jax/methods/gda.py), training-free, with the official settings
(github.com/mrflogs/ICLR24, main_few_shots.py): 10 augmented views of every shot, the shrinkage
precision estimate, alpha searched over 1e-4 ... 100 on the validation shots.

  python train.py --config configs/gda.py:dataset=dtd,shots=4 --workdir runs/dtd_gda
"""

import ml_collections

from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "gda")
  c.gda = ml_collections.ConfigDict(dict(alphas=(1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)))
  # The dataset's CoOp template; ImageNet: the 7-template ensemble (here plus "a photo of a {}.").
  c.templates = "coop_ensemble" if c.dataset == "imagenet" else "coop"
  return c
