"""CoOp, Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022): M context vectors, shared by every class, learned in front of each class name and
encoded by the frozen text tower:

    w_c = normalise(text([SOS] t_1 .. t_M {class_c}. [EOS])),    logits = 100 * normalise(f) @ w^T

trained with cross-entropy; the image embedding f comes from the frozen image tower. The
parameters are one pytree {'ctx': (M, text width)}. M = 16 from N(0, 0.02) (CoOp's default),
or M = 4 from "a photo of a" (its "ctxv1"; configs/coop.py:ctx=4). The class-specific variant
(CSC) is not provided. Layout, run and shared departures: `prompt_learning`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from clip_lora_jax import base as base_lib
from clip_lora_jax import model
from clip_lora_jax.methods import prompt_learning
from clip_lora_jax.methods.prompt_learning import Frozen
from clip_lora_jax.model import Params

SECTION = "coop"


@dataclasses.dataclass(frozen=True)
class Config(prompt_learning.PromptConfig):
  """n_ctx and init as `PromptConfig`."""
  section: ClassVar[str] = SECTION


def init(rng: jax.Array, base: base_lib.BaseModel, config: prompt_learning.PromptConfig) -> Params:
  return {"ctx": prompt_learning.init_context(rng, base, config)}


def text_features(params: Params, frozen: Frozen, config: prompt_learning.PromptConfig
                  ) -> jax.Array:
  """(C, E) unit class embeddings of the prompts with the learned context."""
  del config
  return prompt_learning.encode_classes(frozen, model.Prompts(params["ctx"]))


def logits(params: Params, frozen: Frozen, images: jax.Array,
           config: prompt_learning.PromptConfig, text: jax.Array) -> jax.Array:
  del params, config
  return frozen.scale * prompt_learning.encode_images(frozen, images) @ text.T


train_and_evaluate = prompt_learning.run
load_adapter = prompt_learning.load_adapter
logits_fn = prompt_learning.logits_fn
