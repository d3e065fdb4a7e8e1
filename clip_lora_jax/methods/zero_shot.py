"""Zero-shot CLIP (Radford et al., 2021) as a method: no training, the class embeddings of the
prompt templates `config.templates` names (the dataset's hand-crafted CoOp template, CoOp's 7 + 1
ensemble, CLIP's 80 ImageNet templates, or CLIP-LoRA's single template):

    logits = 100 * normalise(f) @ W^T,    W: (C, E) unit class embeddings (template means)

The adapter file holds W, so it scores images on its own like every other method's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clip_lora_jax.methods import feature_cache
from clip_lora_jax.model import Params, normalize

SECTION = "zero_shot"
INPUT = "embedding"
SCALE = 100.0  # CLIP's learned logit scale, exp(4.6052): the scale of every baseline's logits.


@dataclasses.dataclass(frozen=True)
class Config(feature_cache.MethodConfig):
  """No settings: the templates are the run's (`config.templates`)."""


def init(task: feature_cache.Task, config: Config) -> Params:
  del config
  return {feature_cache.FROZEN: {"classifier": jnp.asarray(task.classifier)}}


def logits(params: Params, x: jax.Array, config: Config) -> jax.Array:
  del config
  return SCALE * normalize(x) @ params[feature_cache.FROZEN]["classifier"].T


train_and_evaluate = feature_cache.run
load_adapter = feature_cache.load_adapter
logits_fn = feature_cache.logits_fn
