"""Shared test fixtures: small random-weight CLIP checkpoints built locally with transformers.

torch and transformers' PyTorch `CLIPModel` serve only as the reference oracle here; the
library never imports torch.
"""

from __future__ import annotations

import pytest

from clip_lora_jax import xla_flags

# In-process tests run JAX as train.py / eval.py do (same XLA flags, hence the same programs):
# results compared with those of the command lines can then be equal to the bit.
xla_flags.use_fast_cpu_flags()

# The `tiny` architecture of clip_lora_jax.model, as a transformers config.
TINY_HF_CONFIG = {
    "projection_dim": 32,
    "text_config": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
                    "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                      "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
}


def random_hf_clip(config: dict, seed: int = 0):
  """A `transformers.CLIPModel` for `config` (a config.json dict) in eval mode, with every
  parameter perturbed by N(0, 0.02) noise so that no bias is zero and no norm is the identity
  (a mapping bug between, say, the q and k biases would otherwise go unnoticed)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p), alpha=0.02)
  return model


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory) -> str:
  """Directory of a random-weight Hugging Face checkpoint of the `tiny` architecture:
  `config.json`, `model.safetensors` and CLIP's tokenizer files, as `save_pretrained` writes
  them."""
  from clip_lora_jax import tokenizer

  directory = tmp_path_factory.mktemp("tiny_hf_checkpoint")
  random_hf_clip(TINY_HF_CONFIG).save_pretrained(directory)
  backend = tokenizer.load_tokenizer().backend
  backend.model_max_length = 77
  backend.save_pretrained(directory)
  return str(directory)
