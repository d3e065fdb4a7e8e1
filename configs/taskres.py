"""TaskRes on frozen CLIP image embeddings (clip_lora_jax/methods/taskres.py):

  python train.py --config configs/taskres.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_taskres
  python train.py --config configs/taskres.py --workdir runs/eurosat_tr --config.taskres.alpha=1

The official scripts' values: torch Adam (Dassl's weight decay 5e-4), batch 256, cosine; lr 2e-3
(ImageNet 2e-4); 100 epochs at 1-4 shots, 200 at 8-16; alpha 0.5 (Flowers 1.0); the base
classifier of the dataset's template (ImageNet: CoOp's 7 + 1 ensemble).
"""

import ml_collections

from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "taskres")
  imagenet = c.dataset == "imagenet"
  c.taskres = ml_collections.ConfigDict(dict(alpha=1.0 if c.dataset == "oxford_flowers" else 0.5))
  c.templates = "coop_ensemble" if imagenet else "coop"
  c.batch_size = 256
  c.epochs = 100 if c.shots <= 4 else 200
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=2e-4 if imagenet else 2e-3, min_learning_rate=0.0, b1=0.9,
      b2=0.999, eps=1e-8, weight_decay=5e-4))
  return c
