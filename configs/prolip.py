"""ProLIP: the visual projection fine-tuned on frozen pooled image features
(clip_lora_jax/methods/prolip.py):

  python train.py --config configs/prolip.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_prolip
  python train.py --config configs/prolip.py --workdir runs/eurosat_prolip --config.views=10

The official validation-free recipe (its ViT-B/16 configs): lam = 1 / shots, torch Adam with
lr 1e-5 and eps 1e-4, no weight decay, cosine to 0 over 300 full-batch steps, 300 augmented
views. The features of 300 views are large for big sets (16-shot ImageNet: 4.8M rows of 768
floats, 14.7 GB): `--config.views` takes fewer.
"""

import ml_collections

from clip_lora_jax import data
from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "prolip")
  c.prolip = ml_collections.ConfigDict(dict(regularization=1.0 / c.shots))
  c.templates = "coop_ensemble" if c.dataset == "imagenet" else "coop"
  c.views = 300
  # One step per epoch on the whole few-shot set, as the official full-batch loop.
  c.batch_size = c.shots * len(data.get_dataset(c.dataset).class_names)
  c.epochs = 300
  c.checkpoint_every = 100
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-5, min_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-4,
      weight_decay=0.0))
  return c
