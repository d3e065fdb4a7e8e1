"""ProGrad, Prompt-aligned Gradient (Zhu et al., ICCV 2023): CoOp whose update never conflicts
with zero-shot CLIP's knowledge. Two gradients of the context: g of the cross-entropy, and g_kl
of the KL divergence from zero-shot CLIP's predictions (hand-crafted prompts, temperature 1) to
the model's; where they conflict, g loses lambda times its component along g_kl:

    g' = g - lambda * (g . u) u   if g . g_kl < 0, with u = g_kl / |g_kl|;   else g' = g

per parameter tensor, as the official code; the optimizer (with its weight decay) then steps
along g'. lambda = 1 (0.8 for Flowers, DTD and EuroSAT at 8 and 16 shots, configs/prograd.py).
The parameters are CoOp's {'ctx': (16, text width)}: zeros then the embeddings of "a photo of
a" (the official start). The reported loss is the cross-entropy. Departure: the official
templates put the type first ("a type of pet, a photo of a {}."); this uses the CoOp
protocol's (`config.templates` chooses). Layout, run and shared departures: `prompt_learning`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from clip_lora_jax.errors import UserError
from clip_lora_jax.methods import coop, prompt_learning
from clip_lora_jax.methods.prompt_learning import Frozen
from clip_lora_jax.model import Params

SECTION = "prograd"
ZERO_SHOT = True


@dataclasses.dataclass(frozen=True)
class Config(prompt_learning.PromptConfig):
  """n_ctx and init as `PromptConfig`; lam: how much of the conflicting component is removed
  (in [0, 1]); temperature: of the KL term (> 0)."""
  section: ClassVar[str] = SECTION

  n_ctx: int = 16
  init: str = "a photo of a"
  lam: float = 1.0
  temperature: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) \
        or not 0.0 <= self.lam <= 1.0:
      raise UserError(f"{SECTION}.lam={self.lam!r}: must be a number in [0, 1]")
    if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
        or not math.isfinite(self.temperature) or self.temperature <= 0:
      raise UserError(f"{SECTION}.temperature={self.temperature!r}: must be a finite number > 0")


def project(g: jax.Array, g_kl: jax.Array, lam: float) -> jax.Array:
  """g without lambda times its component along g_kl when they conflict (g . g_kl < 0)."""
  norm = jnp.linalg.norm(g_kl)
  u = g_kl / jnp.where(norm > 0, norm, 1.0)
  along = jnp.vdot(g, u)
  return jnp.where(along < 0, g - lam * along * u, g)


def distillation(scores: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """The official KL term: cross-entropy from the teacher's softened probabilities, times T^2
  (the KL divergence up to the teacher's entropy, a constant)."""
  target = jax.nn.softmax(teacher / temperature, axis=-1)
  log_p = jax.nn.log_softmax(scores / temperature, axis=-1)
  return -jnp.mean(jnp.sum(target * log_p, axis=-1)) * temperature ** 2


def gradients(params: Params, frozen: Frozen, images: jax.Array, labels: jax.Array,
              config: Config) -> tuple[tuple[jax.Array, jax.Array], Params]:
  """((cross-entropy, logits), the projected gradient)."""
  image = prompt_learning.encode_images(frozen, images)
  teacher = frozen.scale * image @ frozen.zero_shot.T
  scores_of = lambda p: frozen.scale * image @ coop.text_features(p, frozen, config).T

  def both(p):
    scores = scores_of(p)
    return (prompt_learning.cross_entropy(scores, labels),
            distillation(scores, teacher, config.temperature)), scores

  (ce, _), pullback, scores = jax.vjp(both, params, has_aux=True)
  (g,), (g_kl,) = pullback((jnp.ones_like(ce), jnp.zeros_like(ce))), pullback(
      (jnp.zeros_like(ce), jnp.ones_like(ce)))
  return (ce, scores), jax.tree.map(lambda a, b: project(a, b, config.lam), g, g_kl)


init = coop.init
text_features = coop.text_features
logits = coop.logits
train_and_evaluate = prompt_learning.run
load_adapter = prompt_learning.load_adapter
logits_fn = prompt_learning.logits_fn
