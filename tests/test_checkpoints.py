"""Checkpoint tests: numerical parity with transformers' PyTorch CLIPModel and with open_clip's
CLIP (OpenCLIP checkpoints with their open_clip_config.json), layouts, round trips, save_hf, and
errors.

Tolerance asserted in fp32 (CPU): max abs difference <= 1e-5 on image embeddings, text embeddings
and logits, against values of magnitude 1-5. Measured: <= 2.4e-6 for the small models, <= 4.6e-6
for the full ViT-B/16 shape, <= 3.1e-6 against open_clip (where 64-wide heads, OpenAI's shape
rule, would be off by up to 2.8).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import stat
import sys
import types

import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import TINY_HF_CONFIG, random_hf_clip

from clip_lora_jax import checkpoints, model
from clip_lora_jax import tokenizer as tokenizer_lib
from clip_lora_jax.errors import UserError

ATOL = 1e-5

# openai/clip-vit-base-patch16's config.json, abridged to the fields that define the model.
VIT_B16_HF_CONFIG = {
    "model_type": "clip",
    "projection_dim": 512,
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "bos_token_id": 0,
                    "eos_token_id": 2, "pad_token_id": 1},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                      "num_hidden_layers": 12, "image_size": 224, "patch_size": 16,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05},
}


def head64_config(activation: str) -> dict:
  """A small config with 64-wide attention heads, the width OpenAI's shape inference assumes."""
  return {"projection_dim": 32,
          "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1,
                          "num_hidden_layers": 2, "vocab_size": 49408, "hidden_act": activation},
          "vision_config": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                            "num_hidden_layers": 2, "image_size": 32, "patch_size": 16,
                            "hidden_act": activation}}


def hf_state(hf_model: transformers.CLIPModel) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in hf_model.state_dict().items()}


def openclip_state(hf: dict[str, torch.Tensor], text_layers: int, vision_layers: int
                   ) -> dict[str, torch.Tensor]:
  """The OpenAI / OpenCLIP state dict of the same model, built from the HF one with torch ops:
  rename, fuse q, k, v into in_proj, and store the projections as (width, embed_dim)."""
  out = {
      "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
      "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
      "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
      "visual.proj": hf["visual_projection.weight"].T.contiguous(),
      "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
      "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
      "text_projection": hf["text_projection.weight"].T.contiguous(),
      "logit_scale": hf["logit_scale"],
  }
  for param in ("weight", "bias"):
    out[f"visual.ln_pre.{param}"] = hf[f"vision_model.pre_layrnorm.{param}"]
    out[f"visual.ln_post.{param}"] = hf[f"vision_model.post_layernorm.{param}"]
    out[f"ln_final.{param}"] = hf[f"text_model.final_layer_norm.{param}"]
  renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
  for src, dst, layers in (("vision_model", "visual.transformer", vision_layers),
                           ("text_model", "transformer", text_layers)):
    for i in range(layers):
      s, d = f"{src}.encoder.layers.{i}", f"{dst}.resblocks.{i}"
      for param in ("weight", "bias"):
        for a, b in renames.items():
          out[f"{d}.{b}.{param}"] = hf[f"{s}.{a}.{param}"]
        out[f"{d}.attn.in_proj_{param}"] = torch.cat(
            [hf[f"{s}.self_attn.{x}_proj.{param}"] for x in "qkv"])
  return out


def random_inputs(image_size: int, num_images: int = 3, end_positions=(4, 19, 76), seed: int = 0):
  """NHWC images and (N, 77) token ids: start token, random ids, the end token 49407 (the largest
  id) at varying positions including the last, zeros after."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_images, image_size, image_size, 3)).astype(np.float32)
  ids = np.zeros((len(end_positions), 77), np.int64)
  for row, end in zip(ids, end_positions):
    row[1:end] = rng.integers(1, 49406, end - 1)
    row[0], row[end] = 49406, 49407
  return images, ids


def torch_outputs(hf_model: transformers.CLIPModel, images: np.ndarray, ids: np.ndarray):
  """(image embeddings, text embeddings, logits per image) of the torch reference."""
  pixels, tokens = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids)
  with torch.inference_mode():
    out = hf_model(input_ids=tokens, pixel_values=pixels)
    image_emb = hf_model.get_image_features(pixels).pooler_output
    text_emb = hf_model.get_text_features(tokens).pooler_output
  return image_emb.numpy(), text_emb.numpy(), out.logits_per_image.numpy()


def our_outputs(params, cfg: model.CLIPConfig, images: np.ndarray, ids: np.ndarray):
  """(image embeddings, text embeddings, logits) of ours, one jitted pass per tower."""
  image_emb = jax.jit(model.encode_images, static_argnums=2)(params, images, cfg)
  text_emb = jax.jit(model.encode_texts, static_argnums=2)(params, ids.astype(np.int32), cfg)
  logits = model.cosine_logits(image_emb, text_emb, np.exp(params["logit_scale"]))
  return tuple(np.asarray(x) for x in (image_emb, text_emb, logits))


def assert_parity(ours, theirs, atol: float = ATOL):
  for name, a, b in zip(("image embeddings", "text embeddings", "logits"), ours, theirs):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=name)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def tiny(tiny_hf_checkpoint):
  """(checkpoint dir, torch model, our config, our params) of the tiny checkpoint."""
  cfg, params = checkpoints.load_pretrained(tiny_hf_checkpoint)
  return tiny_hf_checkpoint, transformers.CLIPModel.from_pretrained(tiny_hf_checkpoint), cfg, params


# ------------------------------------------------------------------------------------------------
# Parity with transformers.


def test_tiny_hf_checkpoint_matches_torch(tiny):
  _, hf_model, cfg, params = tiny
  assert cfg == model.get_config("tiny")
  assert params["logit_scale"].shape == ()
  images, ids = random_inputs(32)
  assert_parity(our_outputs(params, cfg, images, ids), torch_outputs(hf_model, images, ids))


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_openclip_file_matches_torch(tmp_path, activation):
  hf_model = random_hf_clip(head64_config(activation), seed=1)
  state = openclip_state(hf_model.state_dict(), text_layers=2, vision_layers=2)
  file = tmp_path / "clip.safetensors"
  safetensors.numpy.save_file({k: v.numpy() for k, v in state.items()}, file)

  # No open_clip_config.json: the architecture is inferred from the shapes, the activation given.
  cfg, params = checkpoints.load_pretrained(str(file), openclip_activation=activation)
  hf_cfg = checkpoints.config_from_hf(hf_model.config.to_dict())
  assert cfg == hf_cfg and cfg.activation == activation
  assert_trees_equal(params, checkpoints.params_from_hf(hf_state(hf_model), hf_cfg))
  images, ids = random_inputs(32)
  assert_parity(our_outputs(params, cfg, images, ids), torch_outputs(hf_model, images, ids))


def test_full_vit_b16_matches_torch():
  """The real ViT-B/16 shape, both layouts, one forward pass of each tower."""
  hf_model = random_hf_clip(VIT_B16_HF_CONFIG, seed=2)
  cfg = checkpoints.config_from_hf(VIT_B16_HF_CONFIG)
  assert cfg == model.get_config("ViT-B/16")
  params = checkpoints.params_from_hf(hf_state(hf_model), cfg)

  state = openclip_state(hf_model.state_dict(), text_layers=12, vision_layers=12)
  state = {k: v.numpy() for k, v in state.items()}
  assert checkpoints.config_from_openclip(state) == cfg
  assert_trees_equal(checkpoints.params_from_openclip(state, cfg), params)
  del state

  images, ids = random_inputs(224, num_images=2)
  assert_parity(our_outputs(params, cfg, images, ids), torch_outputs(hf_model, images, ids))


# ------------------------------------------------------------------------------------------------
# Configs and round trips.


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14-336", "tiny"])
def test_configs_round_trip_and_shape_inference(name):
  cfg = model.get_config(name)
  hf_config = checkpoints.config_to_hf(cfg)
  assert checkpoints.config_from_hf(hf_config) == cfg
  assert checkpoints.config_from_hf(json.loads(json.dumps(hf_config))) == cfg
  if cfg.text.width % 64 == 0:  # OpenAI's shape inference assumes 64-wide heads
    with torch.device("meta"):  # shapes only, nothing allocated
      hf_model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(hf_config))
    state = openclip_state(hf_model.state_dict(), cfg.text.layers, cfg.vision.layers)
    shapes = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state.items()}
    assert checkpoints.config_from_openclip(shapes) == cfg


def test_config_defaults_are_transformers():
  # transformers' CLIPConfig defaults are OpenAI's ViT-B/32.
  assert checkpoints.config_from_hf({}) == model.get_config("ViT-B/32")
  partial = checkpoints.config_from_hf({"vision_config": {"patch_size": 16}})
  assert partial == model.get_config("ViT-B/16")


def test_hf_round_trip_is_identity(tiny):
  checkpoint_dir, _, cfg, params = tiny
  state = checkpoints.params_to_hf(params, cfg)
  assert_trees_equal(checkpoints.params_from_hf(state, cfg), params)
  saved = safetensors.numpy.load_file(os.path.join(checkpoint_dir, "model.safetensors"))
  saved = {k: v for k, v in saved.items() if not k.endswith("position_ids")}
  assert_trees_equal(state, saved)
  assert state["logit_scale"].shape == ()

  random_params = model.init_params(jax.random.key(3), cfg)
  assert_trees_equal(checkpoints.params_from_hf(checkpoints.params_to_hf(random_params, cfg), cfg),
                     jax.tree.map(np.asarray, random_params))


def test_save_hf_loads_in_transformers(tiny, tmp_path):
  checkpoint_dir, hf_model, cfg, params = tiny
  out = tmp_path / "exported"
  checkpoints.save_hf(str(out), cfg, params, tokenizer_dir=checkpoint_dir)
  assert not [p for p in os.listdir(tmp_path) if p != "exported"]  # no temporary left behind

  reloaded = transformers.CLIPModel.from_pretrained(out)
  images, ids = random_inputs(32)
  np.testing.assert_array_equal(torch_outputs(reloaded, images, ids)[2],
                                torch_outputs(hf_model, images, ids)[2])
  out_cfg, out_params = checkpoints.load_pretrained(str(out))
  assert out_cfg == cfg
  assert_parity(our_outputs(out_params, cfg, images, ids), torch_outputs(hf_model, images, ids))

  texts = ["a photo of a cat.", "2012 Tesla Model S Sedan"]
  hf_ids = transformers.CLIPTokenizer.from_pretrained(out)(texts, padding="max_length")["input_ids"]
  ours = tokenizer_lib.load_tokenizer(str(out))(texts)
  np.testing.assert_array_equal(np.where(ours == 0, 49407, ours), hf_ids)  # HF pads with the end id


def test_save_hf_default_tokenizer_and_existing_directory(tiny, tmp_path):
  _, _, cfg, params = tiny
  checkpoints.save_hf(str(tmp_path / "a"), cfg, params)
  assert tokenizer_lib.load_tokenizer(str(tmp_path / "a")).vocab_size == 49408
  assert checkpoints.recorded_template(str(tmp_path / "a")) is None
  with pytest.raises(UserError, match="already exists"):
    checkpoints.save_hf(str(tmp_path / "a"), cfg, params)
  with pytest.raises(UserError, match="tokenizer has 49408 tokens but the model's vocabulary "
                                      "has 1000"):
    small_vocab = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=1000))
    checkpoints.save_hf(str(tmp_path / "b"), small_vocab, params)


def test_save_hf_records_the_template_with_the_umask_permissions(tiny, tmp_path):
  _, _, cfg, params = tiny
  old = os.umask(0o022)
  try:
    checkpoints.save_hf(str(tmp_path / "merged"), cfg, params, template="{} texture.")
  finally:
    os.umask(old)
  assert checkpoints.recorded_template(str(tmp_path / "merged")) == "{} texture."
  assert stat.S_IMODE(os.stat(tmp_path / "merged").st_mode) == 0o755
  for name in os.listdir(tmp_path / "merged"):
    assert stat.S_IMODE(os.stat(tmp_path / "merged" / name).st_mode) == 0o644, name


# ------------------------------------------------------------------------------------------------
# Errors.


def test_shape_mismatch_names_key_and_shapes(tiny):
  _, hf_model, cfg, _ = tiny
  state = hf_state(hf_model)
  state["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((97, 48), np.float32)
  with pytest.raises(UserError, match=r"'text_model\.encoder\.layers\.1\.mlp\.fc1\.weight': "
                                      r"expected shape \(96, 48\) .*, found \(97, 48\)"):
    checkpoints.params_from_hf(state, cfg)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tiny):
  _, hf_model, cfg, params = tiny
  deeper = model.get_config("tiny-12")
  with pytest.raises(UserError, match=r"architecture 'tiny-12': missing keys: .*layers\.10\."):
    checkpoints.params_from_hf(hf_state(hf_model), deeper)
  state = {**hf_state(hf_model), "extra.weight": np.zeros(1, np.float32)}
  with pytest.raises(UserError, match="unexpected keys: extra.weight"):
    checkpoints.params_from_hf(state, cfg)
  with pytest.raises(UserError, match="missing keys: ln_final.bias, ln_final.weight"):
    checkpoints.params_from_openclip(hf_state(hf_model), cfg)
  bad_params = {**params, "logit_scale": np.zeros(1, np.float32)}
  with pytest.raises(UserError, match=r"'logit_scale': expected shape \(\) .*, found \(1,\)"):
    checkpoints.params_to_hf(bad_params, cfg)


def test_missing_files_raise(tmp_path, tiny):
  with pytest.raises(UserError, match="not found"):
    checkpoints.load_pretrained(str(tmp_path / "nothing" / "here.safetensors"))
  with pytest.raises(UserError, match="has no config.json"):
    checkpoints.load_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
  with pytest.raises(UserError, match="has no model.safetensors"):
    checkpoints.load_pretrained(str(tmp_path))
  (tmp_path / "weights.bin").write_bytes(b"\0")
  with pytest.raises(UserError, match="only .safetensors"):
    checkpoints.load_pretrained(str(tmp_path / "weights.bin"))
  (tmp_path / "weights.safetensors").write_bytes(b"not safetensors")
  with pytest.raises(UserError, match="could not read safetensors"):
    checkpoints.load_pretrained(str(tmp_path / "weights.safetensors"))


def test_bad_configs_raise():
  with pytest.raises(UserError, match="model_type 'siglip'"):
    checkpoints.config_from_hf({"model_type": "siglip"})
  with pytest.raises(UserError, match="activation 'relu' is not supported"):
    checkpoints.config_from_hf({"text_config": {"hidden_act": "relu"}})
  with pytest.raises(UserError, match="invalid CLIP config.json"):
    checkpoints.config_from_hf({"text_config": {"hidden_size": 65}})
  with pytest.raises(UserError, match="key 'visual.conv1.weight' is missing"):
    checkpoints.config_from_openclip({"logit_scale": np.zeros(())})


@pytest.mark.parametrize("tower,sizes,message", [
    ("vision_config", {"hidden_size": -64}, "vision.width=-64 must be a positive integer"),
    ("text_config", {"num_hidden_layers": 1_000_000}, "text.layers=1000000 is more than any"),
    ("vision_config", {"hidden_size": 65536, "intermediate_size": 262144,
                       "num_hidden_layers": 64, "num_attention_heads": 64},
     "the architecture has about 3.30e+12 parameters, more than any CLIP"),
])
def test_absurd_sizes_in_a_config_json_are_refused_before_anything_is_allocated(
    tmp_path, tower, sizes, message):
  config = json.loads(json.dumps(TINY_HF_CONFIG))
  config[tower].update(sizes)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=re.escape(f"config.json: {message}")):
    checkpoints.load_pretrained(str(tmp_path))  # no weights needed: refused first
  described = dataclasses.asdict(model.get_config("tiny"))
  described["text"]["layers"] = 1_000_000
  with pytest.raises(UserError, match="text.layers=1000000"):
    model.config_from_dict(described)  # an adapter file's base_config


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
  """No network and an empty hub cache (huggingface_hub reads these settings at import)."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("name", ["openai/clip-vit-base-patch16", "ViT-B/16"])
def test_hub_id_without_network_raises(offline_hub, name):
  with pytest.raises(UserError, match=r"'openai/clip-vit-base-patch16'.*could not be fetched.*"
                                      r"download it on a machine"):
    checkpoints.load_pretrained(name)


def test_unknown_architecture_name_raises(offline_hub):
  with pytest.raises(UserError, match=r"'ViT-H/99' is neither a local path nor a named "
                                      r"architecture \(ViT-B/32, ViT-B/16"):
    checkpoints.load_pretrained("ViT-H/99")
  with pytest.raises(UserError, match="not found: it is neither"):
    checkpoints.load_pretrained("no-such-model")
  with pytest.raises(UserError, match="'tiny' has no pretrained weights"):
    checkpoints.load_pretrained("tiny")


# ------------------------------------------------------------------------------------------------
# OpenCLIP checkpoints with their open_clip_config.json, against open_clip itself.

# A tiny OpenCLIP model whose heads are not 64 wide in either tower: vision 128 wide in 32-wide
# heads, text 64 wide in 8-wide heads (OpenAI's shape rule would give 2 and 1 heads, a valid but
# wrong model); a fractional mlp_ratio (open_clip: int(128 * 4.9231) = 630); and
# final_ln_after_pool in both towers, which is accepted as exact.
TINY_OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"width": 128, "head_width": 32, "layers": 2, "mlp_ratio": 4.9231,
                   "patch_size": 8, "image_size": 32, "final_ln_after_pool": True},
    "text_cfg": {"width": 64, "heads": 8, "layers": 2, "final_ln_after_pool": True},
}


@pytest.fixture(scope="module")
def open_clip_model():
  """open_clip's model.py (CLIP and its towers), loaded without the package `__init__`, which
  imports torchvision's transforms. model.py's one torchvision import, FrozenBatchNorm2d (ResNet
  towers only), gets a placeholder where torchvision is unusable (conftest hides it then)."""
  package = types.ModuleType("open_clip_reference")
  package.__path__ = list(importlib.util.find_spec("open_clip").submodule_search_locations)
  sys.modules[package.__name__] = package
  names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
  saved = {name: sys.modules.get(name, KeyError) for name in names}
  if importlib.util.find_spec("torchvision") is None:
    stubs = {name: types.ModuleType(name) for name in names}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    sys.modules.update(stubs)
  try:
    return importlib.import_module("open_clip_reference.model")
  finally:
    for name, module in saved.items():
      if module is KeyError:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def random_open_clip(open_clip_model, model_cfg: dict, seed: int):
  """An open_clip `CLIP` for `model_cfg` in eval mode, every parameter perturbed by N(0, 0.02)
  noise (as random_hf_clip does)."""
  torch.manual_seed(seed)
  clip = open_clip_model.CLIP(**model_cfg).eval()
  with torch.no_grad():
    for p in clip.parameters():
      p.add_(torch.randn_like(p), alpha=0.02)
  return clip


def save_openclip(directory, clip, model_cfg: dict) -> str:
  """`open_clip_config.json` and `open_clip_model.safetensors` in `directory`, as open_clip's
  hub repositories hold them; returns the directory."""
  os.makedirs(directory, exist_ok=True)
  state = {k: v.detach().numpy() for k, v in clip.state_dict().items()}
  safetensors.numpy.save_file(state, os.path.join(directory, checkpoints.OPENCLIP_WEIGHTS))
  with open(os.path.join(directory, checkpoints.OPENCLIP_CONFIG), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": {
        "mean": list(model.CLIP_MEAN), "std": list(model.CLIP_STD)}}, f)
  return str(directory)


@pytest.fixture(scope="module")
def tiny_openclip(open_clip_model, tmp_path_factory):
  """(checkpoint directory, open_clip model) of TINY_OPENCLIP_CFG with gelu, as LAION's models
  (quick_gelu: see test_inert_and_default_openclip_keys_are_accepted)."""
  model_cfg = {**TINY_OPENCLIP_CFG, "quick_gelu": False}
  clip = random_open_clip(open_clip_model, model_cfg, seed=4)
  return save_openclip(tmp_path_factory.mktemp("tiny_openclip"), clip, model_cfg), clip


def test_openclip_checkpoint_with_config_matches_open_clip(tiny_openclip):
  directory, clip = tiny_openclip
  cfg, params = checkpoints.load_pretrained(directory)
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.mlp_dim, cfg.activation) == (
      4, 8, 630, "gelu")
  file_cfg, _ = checkpoints.load_pretrained(os.path.join(directory, checkpoints.OPENCLIP_WEIGHTS))
  assert file_cfg == cfg
  images, ids = random_inputs(32)
  pixels, tokens = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids)
  with torch.inference_mode():
    theirs = (clip.encode_image(pixels).numpy(), clip.encode_text(tokens).numpy(),
              clip.get_logits(pixels, tokens)[0].numpy())
  assert_parity(our_outputs(params, cfg, images, ids), theirs)


@pytest.mark.parametrize("name,heads", [("ViT-H-14", (16, 16)), ("ViT-g-14", (16, 16)),
                                        ("ViT-bigG-14", (16, 20)), ("ViT-e-14", (16, 20))])
def test_laion_configs_give_open_clips_heads(open_clip_model, name, heads):
  """open_clip's own configs of LAION's large ViTs (shipped in its package, nothing downloaded):
  our heads and MLP widths are those of the model open_clip builds (on the meta device); the
  shapes alone, without the config, are refused."""
  path = os.path.join(os.path.dirname(open_clip_model.__file__), "model_configs", f"{name}.json")
  with open(path) as f:
    model_cfg = json.load(f)
  cfg = checkpoints.config_from_openclip_json({"model_cfg": model_cfg})
  with torch.device("meta"):
    clip = open_clip_model.CLIP(**model_cfg)
  for ours, tower in ((cfg.vision, clip.visual.transformer), (cfg.text, clip.transformer)):
    block = tower.resblocks[0]
    assert (ours.layers, ours.width, ours.heads, ours.mlp_dim) == (
        len(tower.resblocks), tower.width, block.attn.num_heads, block.mlp.c_fc.out_features)
  assert (cfg.vision.heads, cfg.text.heads) == heads
  assert cfg.vision.width // cfg.vision.heads in (80, 88, 104, 112)
  assert cfg.activation == "gelu" and cfg.embed_dim == clip.text_projection.shape[1]
  shapes = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in clip.state_dict().items()}
  with pytest.raises(UserError, match=rf"vision width is {cfg.vision.width} \(it is the width of "
                                      r"OpenCLIP's \d+-wide heads\).*open_clip_config\.json"):
    checkpoints.config_from_openclip(shapes)


def openclip_config(section: str, key: str, value) -> dict:
  """TINY_OPENCLIP_CFG's open_clip_config.json with `section.key` set to `value`."""
  config = {"model_cfg": json.loads(json.dumps(TINY_OPENCLIP_CFG)), "preprocess_cfg": {}}
  target = (config if section in ("model_cfg", "preprocess_cfg") else config["model_cfg"])[section]
  target[key] = value
  return config


@pytest.mark.parametrize("section,key,value,message", [
    ("vision_cfg", "ls_init_value", 1e-5, "vision_cfg.ls_init_value=1e-05 asks for layer scale"),
    ("text_cfg", "ls_init_value", 1e-5, "text_cfg.ls_init_value=1e-05 asks for layer scale"),
    ("vision_cfg", "attentional_pool", True, "attentional pooling"),
    ("vision_cfg", "pool_type", "avg", "vision_cfg.pool_type='avg' asks for pooling other"),
    ("vision_cfg", "no_ln_pre", True, "vision_cfg.no_ln_pre=True asks for a vision tower without"),
    ("vision_cfg", "pos_embed_type", "sin_cos_2d", "fixed position embeddings"),
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224", "a timm image tower"),
    ("vision_cfg", "qk_norm", True, "vision_cfg.qk_norm=True asks for q/k LayerNorm"),
    ("vision_cfg", "norm_kwargs", {"eps": 1e-6}, "LayerNorm arguments"),
    ("vision_cfg", "layers", [3, 4, 6, 3], "asks for a ResNet image tower"),
    ("vision_cfg", "image_size", [32, 48], "vision_cfg.image_size=[32, 48]; only square"),
    ("vision_cfg", "head_width", 48, "vision_cfg.width=128 is not a multiple of "
                                     "vision_cfg.head_width=48"),
    ("vision_cfg", "a_new_feature", 1, "unknown key vision_cfg.a_new_feature"),
    ("text_cfg", "hf_model_name", "roberta-base", "a Hugging Face text tower"),
    ("text_cfg", "hf_tokenizer_name", "bert-base", "a tokenizer other than CLIP's"),
    ("text_cfg", "pool_type", "last", "text_cfg.pool_type='last' asks for pooling other"),
    ("text_cfg", "proj_bias", True, "a text projection bias"),
    ("text_cfg", "proj_type", "none", "a text projection other than a matrix"),
    ("text_cfg", "no_causal_mask", True, "bidirectional text attention"),
    ("text_cfg", "embed_cls", True, "a text class token"),
    ("text_cfg", "heads", 5, "text.width=64 is not a multiple of text.heads=5"),
    ("model_cfg", "custom_text", True, "a custom text tower"),
    ("model_cfg", "multimodal_cfg", {"width": 64}, "a multimodal text decoder"),
    ("model_cfg", "init_logit_bias", -10, "a logit bias"),
    ("model_cfg", "quick_gelu", "yes", "model_cfg.quick_gelu='yes' must be true or false"),
    ("preprocess_cfg", "mean", [0.5, 0.5, 0.5], r"preprocess_cfg.mean=[0.5, 0.5, 0.5] is not "
                                                "CLIP's"),
    ("preprocess_cfg", "std", [0.26862954, 0.26130258], "preprocess_cfg.std"),
    ("preprocess_cfg", "resize_mode", "squash", "resizing other than shortest side"),
    ("preprocess_cfg", "interpolation", "bilinear", "resizing other than bicubic"),
])
def test_unsupported_openclip_features_are_refused_by_name(section, key, value, message):
  with pytest.raises(UserError, match=re.escape(message)):
    checkpoints.config_from_openclip_json(openclip_config(section, key, value))


def test_inert_and_default_openclip_keys_are_accepted():
  config = openclip_config("vision_cfg", "patch_dropout", 0.5)
  config["model_cfg"]["vision_cfg"].update(ls_init_value=None, pool_type="tok", output_tokens=True)
  config["model_cfg"]["text_cfg"].update(pool_type="argmax", eos_id=2, hf_model_name=None)
  config["model_cfg"]["init_logit_scale"] = 2.0
  config["preprocess_cfg"] = {"mean": list(model.CLIP_MEAN), "std": list(model.CLIP_STD),
                              "size": 32, "interpolation": "bicubic", "resize_mode": "shortest"}
  plain = checkpoints.config_from_openclip_json(openclip_config("model_cfg", "quick_gelu", False))
  assert checkpoints.config_from_openclip_json(config) == plain and plain.activation == "gelu"
  quick = checkpoints.config_from_openclip_json(openclip_config("model_cfg", "quick_gelu", True))
  assert quick == dataclasses.replace(plain, activation="quick_gelu")


def test_openclip_config_is_checked_first_and_against_the_weights(tiny_openclip, tmp_path):
  directory, _ = tiny_openclip
  weights = os.path.join(directory, checkpoints.OPENCLIP_WEIGHTS)
  # Refused by name before the (unreadable) weights are opened.
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "w.safetensors").write_bytes(b"not safetensors")
  (tmp_path / "bad" / checkpoints.OPENCLIP_CONFIG).write_text(
      json.dumps(openclip_config("vision_cfg", "ls_init_value", 0.1)))
  with pytest.raises(UserError, match="ls_init_value=0.1 asks for layer scale"):
    checkpoints.load_pretrained(str(tmp_path / "bad" / "w.safetensors"))
  # A config that does not fit the weights: the key, both shapes, and the config file.
  (tmp_path / "wide").mkdir()
  shutil.copy(weights, tmp_path / "wide")
  (tmp_path / "wide" / checkpoints.OPENCLIP_CONFIG).write_text(
      json.dumps(openclip_config("vision_cfg", "mlp_ratio", 4.0)))
  with pytest.raises(UserError, match=r"does not fit the architecture of .*open_clip_config\.json"
                                      r"'.*mlp\.c_fc\.weight'.*expected shape \(512, 128\).*"
                                      r"found \(630, 128\)"):
    checkpoints.load_pretrained(str(tmp_path / "wide"))
  assert checkpoints.load_pretrained(directory, openclip_activation="gelu")[0].activation == "gelu"
  with pytest.raises(UserError, match="openclip_activation='quick_gelu' contradicts .*, whose "
                                      "model is built with gelu"):
    checkpoints.load_pretrained(directory, openclip_activation="quick_gelu")
  # Pickled weights are never read.
  (tmp_path / "pickle").mkdir()
  shutil.copy(os.path.join(directory, checkpoints.OPENCLIP_CONFIG), tmp_path / "pickle")
  (tmp_path / "pickle" / checkpoints.OPENCLIP_PICKLE).write_bytes(b"\x80\x02")
  with pytest.raises(UserError, match=r"has no open_clip_model\.safetensors, only the pickled "
                                      r"open_clip_pytorch_model\.bin; .* never from pickles"):
    checkpoints.load_pretrained(str(tmp_path / "pickle"))
  os.remove(tmp_path / "pickle" / checkpoints.OPENCLIP_CONFIG)
  with pytest.raises(UserError, match="has no config.json"):  # neither layout
    checkpoints.load_pretrained(str(tmp_path / "pickle"))


def test_shape_inference_refuses_widths_that_are_not_multiples_of_64(tiny):
  _, hf_model, _, _ = tiny  # text width 48
  state = openclip_state(hf_model.state_dict(), text_layers=2, vision_layers=2)
  with pytest.raises(UserError, match=r"text width is 48 \(not a multiple of 64\)"):
    checkpoints.config_from_openclip({k: v.numpy() for k, v in state.items()})


def test_openclip_hub_name_reads_the_hub_cache_offline(offline_hub, tiny_openclip):
  directory, _ = tiny_openclip
  with pytest.raises(UserError, match=r"'hf-hub:laion/tiny' could not be fetched.*hf download "
                                      r'laion/tiny --include "open_clip_config\.json" --include '
                                      r'"open_clip_model\.safetensors"'):
    checkpoints.load_pretrained("hf-hub:laion/tiny")
  # The hub cache layout: refs/main names the snapshot that holds the files.
  repo = os.path.join(huggingface_hub.constants.HF_HUB_CACHE, "models--laion--tiny")
  commit = "0" * 40
  shutil.copytree(directory, os.path.join(repo, "snapshots", commit))
  os.makedirs(os.path.join(repo, "refs"))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(commit)
  cfg, params = checkpoints.load_pretrained("hf-hub:laion/tiny")
  expected_cfg, expected_params = checkpoints.load_pretrained(directory)
  assert cfg == expected_cfg
  assert_trees_equal(params, expected_params)
  with pytest.raises(UserError, match="expected hf-hub:owner/name"):
    checkpoints.load_pretrained("hf-hub:tiny")
