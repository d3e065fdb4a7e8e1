"""LP++ on frozen CLIP image embeddings (clip_lora_jax/methods/lp_plus_plus.py):

  python train.py --config configs/lp_plus_plus.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_lpp

The official values (FewShot-CLIP-Strong-Baseline, configs/base.yaml and
methods/linear_probe_p2.py): 300 full-batch epochs, the blending weights stepped every 10, SGD
momentum 0.9 on the visual classifier, step sizes from the data (no learning rate to set), one
augmented view of every shot, the best epoch on the validation shots; the dataset's template
(ImageNet: an ensemble). The descent runs inside the method's `init`, so the shared loop does
not train (`epochs = 0`).
"""

import ml_collections

from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "lp_plus_plus")
  c.lp_plus_plus = ml_collections.ConfigDict(dict(epochs=300, alpha_every=10, momentum=0.9))
  c.templates = "coop_ensemble" if c.dataset == "imagenet" else "coop"
  c.views = 1
  return c
