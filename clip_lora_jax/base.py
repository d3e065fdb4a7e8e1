"""The frozen base model of a run: architecture, weights, tokenizer and identity."""

from __future__ import annotations

import dataclasses
import os

import jax

from clip_lora_jax import checkpoints, lora, model, tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """What every method adapts: frozen CLIP weights plus what identifies them."""
  name: str
  config: model.CLIPConfig
  params: model.Params
  tokenizer: tokenizer_lib.Tokenizer

  @property
  def fingerprint(self) -> str:
    return lora.base_fingerprint(self.params)


def load_base_model(name: str, random_init: bool = False, seed: int = 0) -> BaseModel:
  """Loads `name` (hub id, checkpoint directory, OpenCLIP file or architecture name).

  With `random_init`, `name` must be an architecture name and the weights are random: for
  tests and benchmarks, which cannot download weights.
  """
  if random_init:
    config = model.get_config(name)
    params = model.init_params(jax.random.key(seed), config)
  else:
    config, params = checkpoints.load_pretrained(name)
  tokenizer_dir = name if os.path.isdir(name) else None
  return BaseModel(name, config, params,
                   tokenizer_lib.load_tokenizer(tokenizer_dir, config.text.context_length))
