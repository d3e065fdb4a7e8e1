"""LoRA forward and gradients against an independent torch computation on transformers' CLIP.

The torch side adds `scale * (x @ A) @ B` to the output of every adapted `{q,k,v,out}_proj`
with forward hooks on `transformers.CLIPModel`, and differentiates with torch autograd.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from clip_lora_jax import checkpoints, lora, model, training
from conftest import TINY_HF_CONFIG, random_hf_clip

TORCH_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def torch_lora_loss(hf_model, adapter, scale, images, ids, labels):
  """Loss of 100 * cos(image, text) with hooked low-rank branches; returns (loss, image, text,
  {(tower, layer, matrix, 'a'|'b'): leaf tensor})."""
  leaves, hooks = {}, []
  towers = {"vision": hf_model.vision_model, "text": hf_model.text_model}
  for tower, layers in adapter.items():
    for layer_name, layer in layers.items():
      attn = towers[tower].encoder.layers[int(layer_name.split("_")[1])].self_attn
      for matrix, pair in layer["attn"].items():
        a = torch.tensor(np.asarray(pair["a"]), dtype=torch.float64, requires_grad=True)
        b = torch.tensor(np.asarray(pair["b"]), dtype=torch.float64, requires_grad=True)
        leaves[(tower, layer_name, matrix, "a")], leaves[(tower, layer_name, matrix, "b")] = a, b
        hooks.append(getattr(attn, TORCH_NAMES[matrix]).register_forward_hook(
            lambda mod, inp, out, a=a, b=b: out + scale * (inp[0] @ a) @ b))
  try:
    image = hf_model.get_image_features(pixel_values=images).pooler_output
    text = hf_model.get_text_features(input_ids=ids).pooler_output
  finally:
    for h in hooks:
      h.remove()
  logits = 100 * torch.nn.functional.normalize(image, dim=-1) @ \
      torch.nn.functional.normalize(text, dim=-1).T
  return torch.nn.functional.cross_entropy(logits, labels), image, text, leaves


@pytest.mark.parametrize("lora_config", [
    lora.LoRAConfig(dropout=0.0),
    lora.LoRAConfig(encoders="both", matrices=("q", "v", "o"), layers=(1,), rank=3, alpha=2.0,
                    scaling="linear", dropout=0.0),
])
def test_lora_forward_and_gradients_match_torch(lora_config):
  hf_model = random_hf_clip(TINY_HF_CONFIG, seed=3).double()
  state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
  config = checkpoints.config_from_hf(TINY_HF_CONFIG)
  params = checkpoints.params_from_hf(state, config)
  fresh = lora.init(jax.random.PRNGKey(0), config, lora_config)
  # Non-zero b so that the branch and the gradient of a both matter.
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
  adapter = jax.tree.map(lambda x: x if x.any() else 0.1 * jax.random.normal(next(keys), x.shape),
                         fresh)

  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  ids = np.zeros((3, 12), np.int32)
  for row, end in zip(ids, (4, 7, 11)):
    row[0], row[1:end], row[end] = 49406, rng.integers(1, 49406, end - 1), 49407
  labels = np.array([0, 2, 1, 2])

  def loss_fn(lora_params):
    image = model.encode_images(params, jnp.asarray(images), config, lora=lora_params,
                                lora_scale=lora_config.scale)
    text = model.encode_texts(params, jnp.asarray(ids), config, lora=lora_params,
                              lora_scale=lora_config.scale)
    loss, _ = training.classification_loss(image, text, jnp.asarray(labels), 100.0)
    return loss, (image, text)

  (loss, (image, text)), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter)

  t_loss, t_image, t_text, leaves = torch_lora_loss(
      hf_model, adapter, lora_config.scale,
      torch.tensor(images, dtype=torch.float64).permute(0, 3, 1, 2),
      torch.tensor(ids, dtype=torch.long), torch.tensor(labels))
  t_loss.backward()
  # fp32 (ours) against float64 (torch): embeddings to 1e-5, gradients to 1e-4 relative.
  np.testing.assert_allclose(image, t_image.detach().numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(text, t_text.detach().numpy(), rtol=0, atol=1e-5)
  assert float(loss) == pytest.approx(t_loss.item(), rel=1e-5, abs=1e-5)
  assert len(leaves) == 2 * len(lora.targets(config, lora_config))
  for (tower, layer, matrix, ab), leaf in leaves.items():
    got = np.asarray(grads[tower][layer]["attn"][matrix][ab])
    want = leaf.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
