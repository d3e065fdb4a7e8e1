"""LLU (Localized Latent Updates) few-shot training: affine updates of CLIP's frozen image and
text embeddings that apply only near the few-shot data (clip_lora_jax/llu.py).

  python train.py --config configs/llu.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd_llu
  python train.py --config configs/llu.py --workdir runs/eurosat_llu --config.llu.gamma=0.3

Data, base model, templates and evaluation are those of configs/fewshot.py. gamma = 0.5 and
lam = -10 are the paper's values; the optimizer, step count, batch size, views and the
regulariser weight are our own untuned choices (pick others on the validation shots, which
`eval_every` reports, never on the test split).
"""

import ml_collections

from configs import fewshot


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: `key=value,...` over dataset, shots and seed, as for configs/fewshot.py."""
  c = fewshot.get_config(arg)
  c.method = "llu"
  del c.lora
  c.llu = ml_collections.ConfigDict(dict(
      gamma=0.5, lam=-10.0, mode="exp", modalities="both",
      image_clusters=ml_collections.config_dict.placeholder(int),  # None: every shot is an anchor
      text_clusters=ml_collections.config_dict.placeholder(int),
      regularization=1.0, views=10))
  c.total_steps = 300  # on cached embeddings: seconds
  c.batch_size = 256
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.checkpoint_every = 100
  c.log_every = 10
  return c
