"""LLU, Localized Latent Updates (Ibing, Lim & Kobbelt, CVPRW 2023), on frozen CLIP embeddings.

Each adapted modality (image, text) has an affine map f(e) = W e + b of the unit embedding,
initialised to the identity. It is blended in with a locality weight that decays away from the
anchors (the training images' embeddings on the image side, the training class prompts' on the
text side, optionally reduced to cluster centres):

    d(e)  = 1 - clip(max_c cos(e, c), 0, 1)            per sample, over the anchors c
    w(e)  = gamma * exp(lam * d(e))                      not differentiated through
    e'    = normalise(w * normalise(f(e)) + (1 - w) * e)

so an embedding far from every anchor (d = 1) moves by at most 4 * gamma * exp(lam) and unseen
classes keep CLIP's zero-shot predictions. The parameters are one pytree

    {'image': {'w': (E, E), 'b': (E,)}, 'text': {'w': (E, E), 'b': (E,)}}

holding the adapted modalities only. Unlike the paper's code, which takes the maximum similarity
over the whole batch, d is computed for each sample on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.cluster.hierarchy

from clip_lora_jax.errors import UserError
from clip_lora_jax.model import Params, cosine_logits, normalize

MODALITIES = {"image": ("image",), "text": ("text",), "both": ("image", "text")}
MODES = ("exp", "dirac")
# 'dirac' treats e as an anchor when d(e) <= this: 25x the float32 rounding of cos(e, e) for
# unit vectors of 512 to 1024 dimensions (4e-7), far below the distance of distinct images.
DIRAC_TOLERANCE = 1e-5
# Similarities decide the locality weight and W = I must map e to itself bit for bit: no
# reduced-precision (TF32 / bf16) matmul passes on accelerators.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LLUConfig:
  """The LLU method and its training knobs.

  gamma: the weight of the update at an anchor, in [0, 1]. lam: the decay rate of the weight
  with the distance to the nearest anchor, <= 0 (lam = 0 updates everywhere alike). mode: 'exp'
  (gamma * exp(lam * d)) or 'dirac' (gamma at the anchors, 0 elsewhere). modalities: 'image',
  'text' or 'both'. image_clusters / text_clusters: the number of anchor centres of each side
  (None keeps every anchor; the paper clusters only beyond 16 shots). regularization: the weight
  of mean((W - I)^2) + mean(b^2) per modality in the loss (untuned). views: augmented views per
  few-shot image whose embeddings form the training set; learning_rate, steps, batch_size and
  weight_decay drive AdamW.
  """
  gamma: float = 0.5
  lam: float = -10.0
  mode: str = "exp"
  modalities: str = "both"
  image_clusters: int | None = None
  text_clusters: int | None = None
  regularization: float = 1.0
  views: int = 10
  learning_rate: float = 1e-3
  steps: int = 300
  batch_size: int = 256
  weight_decay: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.gamma <= 1.0:
      raise UserError(f"llu.gamma={self.gamma}: must be in [0, 1]")
    if self.lam > 0.0:
      raise UserError(f"llu.lam={self.lam}: must be <= 0 (the weight decays away from anchors)")
    if self.mode not in MODES:
      raise UserError(f"llu.mode={self.mode!r}: use one of {', '.join(MODES)}")
    if self.modalities not in MODALITIES:
      raise UserError(f"llu.modalities={self.modalities!r}: use one of {', '.join(MODALITIES)}")
    for name in ("image_clusters", "text_clusters"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise UserError(f"llu.{name}={value!r}: use a positive integer or None (every anchor)")
    if self.regularization < 0.0:
      raise UserError(f"llu.regularization={self.regularization}: must be >= 0")
    for name in ("views", "steps", "batch_size"):
      if getattr(self, name) <= 0:
        raise UserError(f"llu.{name}={getattr(self, name)}: must be a positive integer")
    if self.learning_rate <= 0.0:
      raise UserError(f"llu.learning_rate={self.learning_rate}: must be > 0")
    if self.weight_decay < 0.0:
      raise UserError(f"llu.weight_decay={self.weight_decay}: must be >= 0")

  @property
  def adapted(self) -> tuple[str, ...]:
    """The modalities that get an update, in a fixed order."""
    return MODALITIES[self.modalities]

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LLUConfig":
    """From a plain dict (a config section or an adapter file's metadata)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise UserError(f"unknown LLU option(s) {sorted(unknown)}; known: "
                      f"{[f.name for f in dataclasses.fields(cls)]}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def init(embed_dim: int, config: LLUConfig) -> Params:
  """Identity maps (W = I, b = 0) for the adapted modalities: LLU starts exactly at CLIP."""
  return {m: {"w": jnp.eye(embed_dim, dtype=jnp.float32),
              "b": jnp.zeros((embed_dim,), jnp.float32)}
          for m in config.adapted}


def cluster_anchors(embeddings: np.ndarray, k: int | None) -> np.ndarray:
  """(N, E) embeddings -> (min(k, N), E) unit anchors, on the host.

  Agglomerative clustering with cosine distance and complete linkage, cut into exactly k
  clusters; each centre is the normalised sum of its unit members. k = None, or k >= N, keeps
  every embedding (normalised).
  """
  if k is not None and k <= 0:
    raise UserError(f"clusters={k}: use a positive integer or None (every anchor)")
  x = np.asarray(embeddings, np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  if k is None or k >= len(x):
    return x.astype(np.float32)
  tree = scipy.cluster.hierarchy.linkage(x, method="complete", metric="cosine")
  labels = scipy.cluster.hierarchy.cut_tree(tree, n_clusters=k)[:, 0]
  centres = np.stack([x[labels == c].sum(axis=0) for c in range(k)])
  return (centres / np.linalg.norm(centres, axis=-1, keepdims=True)).astype(np.float32)


def locality_weight(e: jax.Array, anchors: jax.Array, config: LLUConfig) -> jax.Array:
  """(B, E) embeddings, (N, E) anchors -> (B,) blend weights, each from its own sample.

  Computed in float32, and a constant for autodiff: no gradient flows through the weight.
  """
  e, anchors = (normalize(jnp.asarray(x, jnp.float32)) for x in (e, anchors))
  cos = jnp.matmul(e, anchors.T, precision=_PRECISION)
  d = 1.0 - jnp.clip(jnp.max(cos, axis=-1), 0.0, 1.0)
  if config.mode == "dirac":
    w = jnp.where(d <= DIRAC_TOLERANCE, config.gamma, 0.0)
  else:
    w = config.gamma * jnp.exp(config.lam * d)
  return jax.lax.stop_gradient(w)


def update(side_params: Params, e: jax.Array, anchors: jax.Array, config: LLUConfig) -> jax.Array:
  """(B, E) embeddings -> (B, E) unit updated embeddings of one modality."""
  e = normalize(e)
  w = locality_weight(e, anchors, config)[:, None]
  f = normalize(jnp.matmul(e, side_params["w"].T, precision=_PRECISION) + side_params["b"])
  # e + w (f - e) is w f + (1 - w) e, exact when w = 0 or f = e.
  return normalize(e + w * (f - e))


def adapt(params: Params, modality: str, e: jax.Array, anchors: Mapping[str, jax.Array],
          config: LLUConfig) -> jax.Array:
  """Unit embeddings of `modality` ('image' or 'text'), updated when the config adapts it."""
  if modality not in config.adapted:
    return normalize(e)
  return update(params[modality], e, anchors[modality], config)


def logits(params: Params, image_emb: jax.Array, text_emb: jax.Array,
           anchors: Mapping[str, jax.Array], config: LLUConfig, scale: float = 100.0) -> jax.Array:
  """scale * cos(image', text') for every pair: (B, C). `anchors` maps each adapted modality to
  its (N, E) anchors."""
  return cosine_logits(adapt(params, "image", image_emb, anchors, config),
                       adapt(params, "text", text_emb, anchors, config), scale)


def regularizer(params: Params) -> jax.Array:
  """Sum over the adapted modalities of mean((W - I)^2) + mean(b^2)."""
  return sum(jnp.mean((p["w"] - jnp.eye(p["w"].shape[0], dtype=p["w"].dtype)) ** 2)
             + jnp.mean(p["b"] ** 2) for p in params.values())


def loss(params: Params, image_emb: jax.Array, labels: jax.Array, text_emb: jax.Array,
         anchors: Mapping[str, jax.Array], config: LLUConfig) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of the LLU logits plus the weighted regularizer, and the batch accuracy."""
  z = logits(params, image_emb, text_emb, anchors, config)
  ce = optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
  return ce + config.regularization * regularizer(params), (jnp.argmax(z, -1) == labels).mean()


def num_parameters(params: Params) -> int:
  """Trainable parameter count."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
