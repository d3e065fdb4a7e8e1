"""CLIP-Adapter on frozen CLIP image embeddings (clip_lora_jax/methods/clip_adapter.py):

  python train.py --config configs/clip_adapter.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_ca
  python train.py --config configs/clip_adapter.py --workdir runs/eurosat_ca \\
      --config.clip_adapter.ratio=0.6

The official repository releases the model file only and says to train it with CoOp's commands:
this is CoOp's few-shot recipe (Dassl SGD, lr 0.002, batch 32, cosine; epochs by shots), with
the dataset's hand-crafted template and the code's residual ratio 0.2.
"""

import ml_collections

from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "clip_adapter")
  c.clip_adapter = ml_collections.ConfigDict(dict(ratio=0.2, reduction=4))
  c.templates = "coop"
  c.batch_size = 32
  # CoOp's schedule: 50 epochs at 1 shot, 100 at 2-4, 200 at 8-16; ImageNet 50 at every count.
  c.epochs = 50 if c.shots == 1 or c.dataset == "imagenet" else 100 if c.shots <= 4 else 200
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", momentum=0.9, learning_rate=2e-3, min_learning_rate=0.0, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=5e-4))
  return c
