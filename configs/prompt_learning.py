"""What every prompt-learning method's config shares (clip_lora_jax/methods/prompt_learning.py):
the data, base model and evaluation of configs/fewshot.py, and the Dassl recipe of the official
code: SGD lr 0.002, momentum 0.9, weight decay 5e-4, cosine stepped once an epoch after one
warm-up epoch at the constant 1e-5; batch 32; epochs by shots as CoOp (50 at 1 shot, 100 at 2-4,
200 at 8-16; ImageNet 50 at every count). Each method's file (e.g. configs/coop.py) starts from
`get_config` and sets its section and what its official config changes.
"""

import ml_collections

from configs import fewshot


def coop_epochs(dataset: str, shots: int) -> int:
  """CoOp's epochs: 50 at 1 shot, 100 at 2-4, 200 at 8-16; ImageNet 50 at every count."""
  return 50 if shots == 1 or dataset == "imagenet" else 100 if shots <= 4 else 200


def get_config(arg: str | None, method: str) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = fewshot.get_config(arg)
  c.method = method
  del c.lora
  # Hand-crafted prompts of the zero-shot class embeddings (KgCoOp, ProGrad): "coop" (the
  # dataset's template), "coop_ensemble", "clip_ensemble" or "config" (c.template).
  c.templates = "coop"
  c.batch_size = 32
  c.epochs = coop_epochs(c.dataset, c.shots)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", momentum=0.9, learning_rate=2e-3, min_learning_rate=0.0, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=5e-4, schedule="dassl", warmup_epochs=1,
      warmup_learning_rate=1e-5))
  c.checkpoint_every = 1000
  return c


def split_arg(arg: str | None, own: tuple[str, ...]) -> tuple[str, str]:
  """`arg` -> (the items over dataset, shots and seed; the items over the keys `own`)."""
  items = [item for item in (arg or "").split(",") if item]
  mine = [item for item in items if item.partition("=")[0].strip() in own]
  return ",".join(item for item in items if item not in mine), ",".join(mine)
