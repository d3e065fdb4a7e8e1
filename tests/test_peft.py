"""PEFT interop (`clip_lora_jax.peft`) against peft and transformers' PyTorch `CLIPModel`.

The oracle loads our exported directories with `PeftModel.from_pretrained` and trains PEFT
adapters with `get_peft_model`. Tolerance asserted in fp32 (CPU), as in tests/test_checkpoints.py:
max abs difference <= 1e-5 on image embeddings, text embeddings and logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import ENV, ROOT
from test_checkpoints import assert_parity, our_outputs, random_inputs, torch_outputs

from clip_lora_jax import base as base_lib
from clip_lora_jax import block_lora, llu, lora
from clip_lora_jax import peft as peft_interop
from clip_lora_jax.errors import UserError

EXPORTED = [
    lora.LoRAConfig(matrices=("q", "k", "v", "o"), layers=(1,), rank=3, alpha=2.0),
    lora.LoRAConfig(encoders="text", matrices=("k", "o"), rank=2, alpha=1.5, scaling="linear",
                    dropout=0.0),
    block_lora.BlockLoRAConfig(blocks=4, split="input", rank=2),
    block_lora.BlockLoRAConfig(blocks=2, split="rank", rank=4, alpha=3.0, matrices=("q", "v")),
]


@pytest.fixture(scope="module")
def base(tiny_hf_checkpoint) -> base_lib.BaseModel:
  return base_lib.load_base_model(tiny_hf_checkpoint)


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
  return random_inputs(32)


def random_adapter(base: base_lib.BaseModel, config: lora.LoRAConfig, seed: int = 0
                   ) -> lora.Adapter:
  """An adapter of `config` whose every factor is random (b too, and each B_i of a rank split
  differs), so that every entry of every factor matters."""
  tree = lora.init(jax.random.key(seed), base.config, config)
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  noisy = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return lora.Adapter(jax.tree.unflatten(treedef, noisy), config, base.name, base.config,
                      base.fingerprint, few_shot={"dataset": "dtd", "shots": 1},
                      template="a photo of a {}.")


def peft_model(checkpoint: str, peft_dir: str) -> peft.PeftModel:
  return peft.PeftModel.from_pretrained(transformers.CLIPModel.from_pretrained(checkpoint),
                                        peft_dir).eval()


def merged_outputs(base: base_lib.BaseModel, adapter: lora.Adapter, inputs):
  return our_outputs(lora.merge(base.params, adapter.lora, adapter.config), base.config, *inputs)


@pytest.mark.parametrize("config", EXPORTED, ids=["lora", "lora-text-linear", "block-input",
                                                  "block-rank"])
def test_exported_adapters_load_in_peft_with_our_outputs_and_import_back(
    config, base, inputs, tiny_hf_checkpoint, tmp_path):
  adapter = random_adapter(base, config)
  lora.save_adapter(str(tmp_path / "adapter.safetensors"), adapter)
  peft_config, notes = peft_interop.export_adapter(str(tmp_path / "adapter.safetensors"),
                                                   str(tmp_path / "peft"))
  with open(tmp_path / "peft" / "adapter_config.json") as f:
    assert json.load(f) == peft_config
  rank = config.rank // config.blocks if getattr(config, "split", "") == "rank" else config.rank
  assert peft_config["r"] == rank
  assert len(peft_config["target_modules"]) == len(lora.targets(base.config, config))
  assert peft_config["use_rslora"] == (config.scaling == "sqrt")
  assert any(config.method in note and "plain LoRA" in note for note in notes) == \
      (config.method == "block_lora")
  assert "a photo of a {}." in (tmp_path / "peft" / "README.md").read_text()

  model = peft_model(tiny_hf_checkpoint, str(tmp_path / "peft"))
  for tower, layer, matrix in lora.targets(base.config, config):
    module = model.get_submodule(peft_interop.attention_modules(base.config)[(tower, layer,
                                                                              matrix)])
    assert module.scaling["default"] == pytest.approx(config.scale, rel=1e-15)
  ours = merged_outputs(base, adapter, inputs)
  assert_parity(ours, torch_outputs(model, *inputs))
  assert np.abs(ours[2] - our_outputs(base.params, base.config, *inputs)[2]).max() > 1e-2

  imported = peft_interop.import_adapter(str(tmp_path / "peft"), tiny_hf_checkpoint)
  assert (imported.base_config, imported.base_fingerprint) == (base.config, base.fingerprint)
  if config.method == "lora":  # the round trip is the identity
    assert imported.config == config
    assert jax.tree.all(jax.tree.map(np.array_equal, imported.lora, adapter.lora))
  else:  # the plain LoRA of the pairs, computing the same
    assert imported.config.rank == rank
    assert_parity(merged_outputs(base, imported, inputs), merged_outputs(base, adapter, inputs))


def test_an_adapter_trained_with_peft_imports_with_its_outputs(base, inputs, tiny_hf_checkpoint,
                                                               tmp_path):
  torch.manual_seed(0)
  model = peft.get_peft_model(
      transformers.CLIPModel.from_pretrained(tiny_hf_checkpoint),
      peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True, lora_dropout=0.1,
                      target_modules=["q_proj", "v_proj", "out_proj"]))
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
  images, ids = inputs
  pixels, tokens = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids)
  for _ in range(3):
    logits = model(input_ids=tokens, pixel_values=pixels).logits_per_image
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(images)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  model.eval().save_pretrained(str(tmp_path / "peft"))

  adapter = peft_interop.import_adapter(str(tmp_path / "peft"), tiny_hf_checkpoint)
  assert adapter.config == lora.LoRAConfig(matrices=("q", "v", "o"), layers="all", rank=2,
                                           alpha=3.0, scaling="sqrt", dropout=0.1)
  assert all(np.abs(b).max() > 0 for b in jax.tree.leaves(
      jax.tree.map(lambda pair: pair["b"], adapter.lora, is_leaf=lambda x: "b" in x)))
  ours = merged_outputs(base, adapter, inputs)
  assert_parity(ours, torch_outputs(model, *inputs))
  assert np.abs(ours[2] - our_outputs(base.params, base.config, *inputs)[2]).max() > 1e-2
