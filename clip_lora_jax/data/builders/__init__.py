"""TFDS builders for the benchmark datasets that TFDS lacks, and for the user's own images;
importing this registers them."""

from clip_lora_jax.data.builders import fgvc_aircraft, ucf101_frames, user_images

__all__ = ["fgvc_aircraft", "ucf101_frames", "user_images"]
