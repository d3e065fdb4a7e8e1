"""clip_lora_jax: few-shot adaptation of CLIP vision-language models in JAX/Flax."""
