"""What every feature-cache method's config shares (clip_lora_jax/methods/feature_cache.py): the
data, base model and evaluation of configs/fewshot.py, the cached views, the classifier's
templates, and training counted in epochs over the shots. Each method's file (e.g.
configs/tip_adapter.py) starts from `get_config` and sets its section and recipe.
"""

import ml_collections

from configs import fewshot


def get_config(arg: str | None, method: str) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = fewshot.get_config(arg)
  c.method = method
  del c.lora
  c.views = 10  # Augmented views of every shot whose features are cached (Tip-Adapter's 10).
  # Zero-shot classifier: "coop" (the dataset's hand-crafted template, as the baselines' code),
  # "coop_ensemble" (7 + 1), "clip_ensemble" (CLIP's 80 for ImageNet) or "config" (c.template).
  c.templates = "coop"
  c.epochs = 0  # Passes over the shots x classes rows; 0 for training-free methods.
  c.select_epoch = False  # Keep the epoch that scores best on the validation shots.
  c.batch_size = 256
  c.checkpoint_every = 1000
  c.log_every = 10
  c.eval_every = 0
  return c
