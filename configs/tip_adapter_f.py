"""Tip-Adapter-F (clip_lora_jax/methods/tip_adapter.py): Tip-Adapter whose cache keys train,
with the official recipe (github.com/gaopengcuhk/Tip-Adapter, main.py and configs/*.yaml):
AdamW lr 1e-3, eps 1e-4, torch's default weight decay 0.01, cosine to 0 over 20 epochs (EuroSAT
100) of batch 256, cross-entropy at the initial alpha and beta; then alpha and beta are
searched on the validation shots. The epoch kept is the best on the validation shots (the
official code picks it on the test set).

  python train.py --config configs/tip_adapter_f.py:dataset=dtd,shots=4 --workdir runs/dtd_tipf
"""

import ml_collections

from configs import tip_adapter


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = tip_adapter.get_config(arg, "tip_adapter_f")
  c.tip_adapter.train_keys = True
  c.epochs = 100 if c.dataset == "eurosat" else 20
  c.select_epoch = True
  c.batch_size = 256
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, min_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-4,
      weight_decay=1e-2))
  return c
