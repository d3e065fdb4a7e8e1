"""TFDS builders for the benchmark datasets that TFDS lacks; importing this registers them."""

from clip_lora_jax.data.builders import fgvc_aircraft, ucf101_frames
