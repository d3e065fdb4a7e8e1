"""PEFT interop (`clip_lora_jax.peft`) against peft and transformers' PyTorch `CLIPModel`.

The oracle loads our exported directories with `PeftModel.from_pretrained` and trains PEFT
adapters with `get_peft_model`. Tolerance asserted in fp32 (CPU), as in tests/test_checkpoints.py:
max abs difference <= 1e-5 on image embeddings, text embeddings and logits (measured <= 2.9e-6).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import ENV, ROOT
from test_checkpoints import assert_parity, our_outputs, random_inputs, torch_outputs

from clip_lora_jax import base as base_lib
from clip_lora_jax import lora
from clip_lora_jax.methods import block_lora, llu
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


def _module(tower: str, layer: int, matrix: str) -> str:
  projection = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}[matrix]
  return f"base_model.model.{tower}_model.encoder.layers.{layer}.self_attn.{projection}"


def _drop(*targets):
  def mutate(_, tensors):
    for target in targets:
      for factor in ("A", "B"):
        del tensors[f"{_module(*target)}.lora_{factor}.weight"]
  return mutate


def _add(key: str, shape: tuple[int, ...]):
  return lambda _, tensors: tensors.update({key: np.zeros(shape, np.float32)})


def _rank3(_, tensors):
  tensors[f"{_module('text', 0, 'q')}.lora_A.weight"] = np.zeros((3, 48), np.float32)
  tensors[f"{_module('text', 0, 'q')}.lora_B.weight"] = np.zeros((48, 3), np.float32)


REFUSALS = {
    "bias": (lambda c, _: c.update(bias="lora_only"), r"bias='lora_only' trains biases"),
    "dora": (lambda c, _: c.update(use_dora=True), r"use_dora=True cannot be represented: DoRA"),
    "modules_to_save": (lambda c, _: c.update(modules_to_save=["visual_projection"]),
                        r"modules_to_save=\['visual_projection'\] cannot be represented"),
    "variant": (lambda c, _: c.update(use_bdlora={"nblocks": 2}), r"use_bdlora=.* cannot be"),
    "pissa": (lambda c, _: c.update(init_lora_weights="pissa"), r"'pissa' changes the base"),
    "loha": (lambda c, _: c.update(peft_type="LOHA"), r"peft_type 'LOHA' is not LoRA"),
    "alpha_pattern": (lambda c, _: c.update(alpha_pattern={"q_proj": 4}),
                      r"alpha_pattern=.* one alpha for every module"),
    "mlp": (_add("base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.weight", (2, 48)),
            r"cannot represent: .*layers\.0\.mlp\.fc1\.lora_A\.weight"),
    "projection": (_add("base_model.model.visual_projection.lora_A.weight", (2, 64)),
                   r"cannot represent: base_model\.model\.visual_projection\.lora_A\.weight"),
    "lora_bias": (_add(f"{_module('vision', 0, 'q')}.lora_B.bias", (64,)),
                  r"cannot represent: .*q_proj\.lora_B\.bias"),
    "deeper_base": (_add(f"{_module('vision', 5, 'q')}.lora_A.weight", (2, 64)),
                    r"layers\.5\.self_attn\.q_proj.*2 vision and 2 text layers"),
    "ranks": (_rank3, r"different ranks .*text_model\.encoder\.layers\.0\.self_attn\.q_proj: 3"),
    "layers_per_tower": (_drop(("vision", 0, "q"), ("vision", 0, "k"), ("vision", 0, "v"),
                               ("text", 1, "q"), ("text", 1, "k"), ("text", 1, "v")),
                         r"different layers in each tower \(vision: \[1\]; text: \[0\]\)"),
    "matrices_per_layer": (_drop(("vision", 0, "q")), r"different projections in different "
                           r"layers \(vision layer 0: k, v; vision layer 1: q, k, v\)"),
    "half_pair": (lambda _, t: t.pop(f"{_module('text', 1, 'v')}.lora_B.weight"),
                  r"v_proj has \['A'\] but not both lora_A and lora_B"),

    "dropout": (lambda c, _: c.update(lora_dropout=1.0), r"lora.dropout=1.0: must be in"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_what_our_lora_cannot_represent_is_refused_by_name(name, base):
  peft_config, tensors = peft_interop.to_peft(random_adapter(base, lora.LoRAConfig()))
  mutate, message = REFUSALS[name]
  mutate(peft_config, tensors)
  with pytest.raises(UserError, match=message):
    peft_interop.from_peft(peft_config, tensors, base.name, base.config, base.fingerprint,
                           where="PEFT adapter 'x'")


def test_a_wrong_width_names_the_module_and_both_shapes(base):
  peft_config, tensors = peft_interop.to_peft(random_adapter(base, lora.LoRAConfig()))
  tensors[f"{_module('text', 0, 'k')}.lora_A.weight"] = np.zeros((2, 40), np.float32)
  with pytest.raises(UserError, match=r"text_model\.encoder\.layers\.0\.self_attn\.k_proj has "
                                      r"lora_A \(2, 40\) and lora_B \(48, 2\) where \(r, 48\)"):
    peft_interop.from_peft(peft_config, tensors, base.name, base.config, base.fingerprint, "x")


def test_llu_adapters_and_bad_paths_do_not_export(base, tmp_path):
  config = llu.LLUConfig()
  embed = base.config.embed_dim
  adapter = llu.Adapter(llu.init(embed, config), {m: np.zeros((2, embed), np.float32)
                                                  for m in config.adapted},
                        config, base.name, base.config, base.fingerprint)
  llu.save_adapter(str(tmp_path / "llu.safetensors"), adapter)
  with pytest.raises(UserError, match=r"holds a llu adapter \(clip_lora_jax\.llu/1\).*PEFT's "
                                      "LoRA cannot represent it"):
    peft_interop.export_adapter(str(tmp_path / "llu.safetensors"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(UserError, match="already exists and is not an empty directory"):
    peft_interop.export_adapter(str(tmp_path / "llu.safetensors"), str(tmp_path / "full"))
  with pytest.raises(UserError, match="does not exist"):
    peft_interop.export_adapter(str(tmp_path / "none.safetensors"), str(tmp_path / "out"))


def test_the_command_line_exports_and_imports(base, tiny_hf_checkpoint, tmp_path, capsys):
  adapter = random_adapter(base, block_lora.BlockLoRAConfig(blocks=2, split="rank", rank=4))
  lora.save_adapter(str(tmp_path / "adapter.safetensors"), adapter)
  peft_interop.main(["export", str(tmp_path / "adapter.safetensors"), str(tmp_path / "peft")])
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith(f"wrote {tmp_path / 'peft'}: PEFT LoRA of 12 modules, r=2, ")
  assert out[1].startswith("note: a block_lora adapter (BlockLoRAConfig(") and \
      "exported as the equivalent plain LoRA of its pairs(): rank 2" in out[1]
  # The base defaults to the directory's base_model_name_or_path, here the checkpoint's path.
  peft_interop.main(["import", str(tmp_path / "peft"), str(tmp_path / "imported.safetensors")])
  assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'imported.safetensors'}: "
                                            "LoRAConfig(encoders='both', matrices=('q', 'k', 'v')")
  imported = lora.load_adapter(str(tmp_path / "imported.safetensors"))
  lora.check_compatible(imported, base.name, base.config, base.fingerprint)
  assert jax.tree.all(jax.tree.map(np.array_equal, imported.lora,
                                   adapter.config.pairs(adapter.lora)))
  with pytest.raises(SystemExit) as exit_info:
    peft_interop.main(["import", str(tmp_path / "peft"), str(tmp_path / "imported.safetensors"),
                       "--model", tiny_hf_checkpoint])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (f"error: {str(tmp_path / 'imported.safetensors')!r} already "
                                     "exists; choose a new path or remove it first\n")


def test_the_command_line_refuses_in_one_line(base, tiny_hf_checkpoint, tmp_path):
  peft_config, tensors = peft_interop.to_peft(random_adapter(base, lora.LoRAConfig()))
  (tmp_path / "dora").mkdir()
  with open(tmp_path / "dora" / "adapter_config.json", "w") as f:
    json.dump({**peft_config, "use_dora": True}, f)
  safetensors.numpy.save_file(tensors, str(tmp_path / "dora" / "adapter_model.safetensors"))
  result = subprocess.run(
      [sys.executable, "-m", "clip_lora_jax.peft", "import", str(tmp_path / "dora"),
       str(tmp_path / "out.safetensors"), "--model", tiny_hf_checkpoint],
      env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert (result.returncode, result.stdout) == (2, "")
  assert result.stderr.startswith("error: PEFT adapter ") and result.stderr.count("\n") == 1
  assert "use_dora=True cannot be represented: DoRA" in result.stderr
  assert not os.path.exists(tmp_path / "out.safetensors")


def test_a_named_layer_set_of_towers_of_different_depths_survives_the_round_trip(base):
  deeper = dataclasses.replace(base.config, vision=dataclasses.replace(base.config.vision,
                                                                       layers=4), name="")
  config = lora.LoRAConfig(layers="half-up", matrices=("v",))
  tree = lora.init(jax.random.key(0), deeper, config)
  adapter = lora.Adapter(tree, config, "deeper", deeper, "0" * 16)
  peft_config, tensors = peft_interop.to_peft(adapter)
  assert peft_config["target_modules"] == [
      "text_model.encoder.layers.1.self_attn.v_proj",
      "vision_model.encoder.layers.2.self_attn.v_proj",
      "vision_model.encoder.layers.3.self_attn.v_proj"]
  imported = peft_interop.from_peft(peft_config, tensors, "deeper", deeper, "0" * 16, "x")
  assert imported.config == config
