"""CLAP and ZS-LP on frozen CLIP image embeddings (clip_lora_jax/methods/clap.py):

  python train.py --config configs/clap.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_clap
  python train.py --config configs/clap.py --workdir runs/eurosat_zslp --config.clap.constraint=none

The official values (jusiro/CLAP, configs/trainers/SGD_lr1e-1_B256_ep300.yaml and
scripts/adapt.sh): SGD lr 0.1 (momentum 0.9, Dassl's default), no weight decay, cosine to 0,
300 epochs, batch 256; 20 augmented views of every shot; the constraint "l2"; the dataset's
template (ImageNet: CoOp's 7 templates plus "a photo of a {}."); the last epoch kept.
"""

import ml_collections

from configs import features


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = features.get_config(arg, "clap")
  c.clap = ml_collections.ConfigDict(dict(constraint="l2"))
  c.templates = "coop_ensemble" if c.dataset == "imagenet" else "coop"
  c.views = 20
  c.epochs = 300
  c.batch_size = 256
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, min_learning_rate=0.0, momentum=0.9, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0))
  return c
