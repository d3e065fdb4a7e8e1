"""Run under 8 simulated CPU devices: N train steps on a 1-device mesh, an 8-device data mesh,
and an 8-device mesh with FSDP base weights; prints the max abs LoRA difference as JSON, and
that of frozen image features (LLU's training set) gathered from 8 devices against 1."""

import json
import sys

import jax
import numpy as np

from clip_lora_jax import features, lora, model, prompts, sharding, training
from clip_lora_jax.methods import lora as lora_method
from configs import fewshot


CONFIG = model.get_config("tiny")


def run(mesh, params, fsdp: bool, steps: int = 4):
  lora_config = lora.LoRAConfig(rank=2)
  opt_config = fewshot.get_config().optimizer
  opt_config.learning_rate = 1e-2
  optimizer = training.make_optimizer(opt_config, steps)
  ids = np.zeros((5, 8), np.int32)  # prompts of 3 to 6 tokens
  ids[:, 0], ids[:, 1:6] = 49406, 269
  for row, end in enumerate((3, 5, 2, 4, 3)):
    ids[row, end], ids[row, end + 1:] = 49407, 0
  packed = prompts.pack_prompts(ids, row_length=8, row_multiple=mesh.size)  # 3 rows, padded
  step_config = lora_method.StepConfig(CONFIG, lora_config)
  step = lora_method.make_train_step(step_config, optimizer, mesh)
  state = sharding.put_replicated(
      lora_method.init_state(0, lora.init(jax.random.PRNGKey(0), CONFIG, lora_config), optimizer),
      mesh)
  params = jax.device_put(params, sharding.params_sharding(params, mesh, fsdp))
  text = prompts.shard_packed(packed, mesh)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    batch = sharding.global_batch(mesh, {
        "image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 5, 16).astype(np.int32)})
    state, _ = step(state, params, batch["image"], batch["label"], text)
  return jax.device_get(state["lora"])


def image_features(mesh, params):
  """Pooled features of 20 images in batches of 8 (the last one padded and masked)."""
  images = np.random.default_rng(1).normal(size=(24, 32, 32, 3)).astype(np.float32)
  mask = (np.arange(24) < 20).astype(np.int32)
  batches = [{"image": images[i:i + 8], "label": np.arange(i, i + 8, dtype=np.int32),
              "mask": mask[i:i + 8]} for i in (0, 8, 16)]
  emb, labels = features.embed_batches(params, CONFIG, batches, mesh)
  assert emb.shape == (20, CONFIG.vision.width) and list(labels) == list(range(20)), (emb.shape, labels)
  return emb


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  base = model.init_params(jax.random.key(0), CONFIG)
  single = run(sharding.make_mesh(1), base, fsdp=False)
  diffs = {}
  for name, fsdp in (("data", False), ("fsdp", True)):
    sharded = run(sharding.make_mesh(8), base, fsdp=fsdp)
    diffs[name] = max(float(np.abs(a - b).max())
                      for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)))
  diffs["moved"] = max(float(np.abs(x).max()) for x in jax.tree.leaves(single))
  diffs["features"] = float(np.abs(image_features(sharding.make_mesh(1), base)
                                   - image_features(sharding.make_mesh(8), base)).max())
  json.dump(diffs, sys.stdout)
