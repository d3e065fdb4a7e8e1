"""The few-shot methods, by the name `config.method` gives them.

A new method is one module (its math and a `train_and_evaluate(config, workdir)`), one config
file, and one line in each table below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from clip_lora_jax import block_lora, files, llu, lora, training
from clip_lora_jax.errors import UserError

# Weight-space adapters (LoRA and its variants) share the train step of `training`.
TRAINERS: dict[str, Callable[[ml_collections.ConfigDict, str], dict[str, Any]]] = {
    lora.LoRAConfig.method: training.train_and_evaluate,
    block_lora.BlockLoRAConfig.method: training.train_and_evaluate,
    "llu": llu.train_and_evaluate,
}
# Adapter file format -> its reader.
ADAPTER_READERS: dict[str, Callable[[str], Any]] = {
    lora.FORMAT: lora.load_adapter,
    llu.FORMAT: llu.load_adapter,
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config.method` (train.py's entry point)."""
  if config.method not in TRAINERS:
    raise UserError(f"config.method={config.method!r}: use one of {', '.join(TRAINERS)}")
  return TRAINERS[config.method](config, workdir)


def load_adapter(path: str) -> lora.Adapter | llu.Adapter:
  """Any method's adapter file, read by the reader of its format."""
  _, metadata = files.read_safetensors(path, tensors=False)
  reader = ADAPTER_READERS.get(metadata.get("format", ""))
  if reader is None:
    raise UserError(f"{path!r} is not a clip_lora_jax adapter file (format "
                    f"{metadata.get('format')!r}; known: {', '.join(ADAPTER_READERS)})")
  return reader(path)
