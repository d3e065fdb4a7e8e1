"""Class prompts of a run: their token ids, and prompts packed side by side for the text tower.

The text tower is causal and pools at each prompt's end-of-text token, so a prompt's embedding
depends only on its own tokens up to that token. `pack_prompts` therefore cuts every prompt at
its end token and places the prompts next to each other in rows of one fixed length (first fit,
longest first); the tower runs each row once, every token attending only to the tokens of its
own prompt (`model.TextTower`). Each embedding equals that of the prompt encoded alone (up to
float rounding), and the text work is the prompts' total length instead of their count times
the longest: ImageNet's 1,000 prompts "a photo of a {}." (8 to 18 tokens, 9,165 in all) fill
147 rows of 64 positions (97% used), where one padded batch is 1,000 rows of 18. One packed
batch also compiles the text tower once, whatever the lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from clip_lora_jax import model, sharding
from clip_lora_jax.tokenizer import Tokenizer

# Positions per packed row unless a prompt is longer. Attention costs each token the row's
# length; 64 keeps that a few percent of a block's work while rows fill up well.
ROW_LENGTH = 64


@flax.struct.dataclass
class PackedPrompts:
  """Prompts packed into rows (a pytree of arrays, as the train step takes it).

  token_ids: (R, L) int32; slots after the last prompt of a row hold token 0.
  positions: (R, L) int32, each token's position in its own prompt; 0 in empty slots (each of
    which is then a one-token prompt of its own that nothing pools).
  end_rows, end_cols: (C,) int32, where prompt c's end-of-text token sits.
  """
  token_ids: jax.Array
  positions: jax.Array
  end_rows: jax.Array
  end_cols: jax.Array

  @property
  def ends(self) -> tuple[jax.Array, jax.Array]:
    return self.end_rows, self.end_cols


def class_prompt_ids(tokenizer: Tokenizer, class_names: Sequence[str], template: str) -> np.ndarray:
  """Token ids of `template.format(name)` for every class, cut exactly to the longest prompt."""
  return model.trim_token_ids(tokenizer([template.format(n) for n in class_names]), multiple=1)


def pack_prompts(token_ids: np.ndarray, row_length: int | None = None,
                 row_multiple: int = 1) -> PackedPrompts:
  """(C, T) prompt token ids (each row ending with its end-of-text token, the largest id) ->
  the prompts packed into rows of `row_length` (default: ROW_LENGTH, or the longest prompt if
  longer) by first fit in order of decreasing length; the row count is padded with empty rows
  to a multiple of `row_multiple` (the devices the rows are sharded over)."""
  token_ids = np.asarray(token_ids)
  lengths = np.argmax(token_ids, axis=-1) + 1
  row_length = max(int(lengths.max()), row_length or ROW_LENGTH)
  free: list[int] = []  # Free positions left in each row.
  place = np.zeros((len(token_ids), 2), np.int64)  # (row, first column) of each prompt.
  for prompt in np.argsort(-lengths, kind="stable"):
    length = int(lengths[prompt])
    row = next((r for r, space in enumerate(free) if space >= length), len(free))
    if row == len(free):
      free.append(row_length)
    place[prompt] = row, row_length - free[row]
    free[row] -= length
  rows = -(-len(free) // row_multiple) * row_multiple
  packed_ids = np.zeros((rows, row_length), np.int32)
  positions = np.zeros((rows, row_length), np.int32)
  for prompt, (row, start) in enumerate(place):
    length = int(lengths[prompt])
    packed_ids[row, start:start + length] = token_ids[prompt, :length]
    positions[row, start:start + length] = np.arange(length)
  ends = place[:, 1] + lengths - 1
  return PackedPrompts(packed_ids, positions, place[:, 0].astype(np.int32), ends.astype(np.int32))


def one_per_row(token_ids: np.ndarray) -> PackedPrompts:
  """(C, T) prompt token ids as they are, one prompt per row and nothing cut (what packing
  saves is measured against this)."""
  token_ids = np.asarray(token_ids, np.int32)
  rows = np.arange(len(token_ids), dtype=np.int32)
  positions = np.broadcast_to(np.arange(token_ids.shape[1], dtype=np.int32), token_ids.shape)
  return PackedPrompts(token_ids, np.ascontiguousarray(positions), rows,
                       np.argmax(token_ids, axis=-1).astype(np.int32))


def shard_packed(packed: PackedPrompts, mesh: jax.sharding.Mesh) -> PackedPrompts:
  """The packed rows split over the mesh's devices (the pooling indices replicated)."""
  rows, everywhere = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return PackedPrompts(jax.device_put(packed.token_ids, rows),
                       jax.device_put(packed.positions, rows),
                       jax.device_put(packed.end_rows, everywhere),
                       jax.device_put(packed.end_cols, everywhere))


def encode_packed(params: model.Params, packed: PackedPrompts, config: model.CLIPConfig,
                  **options) -> jax.Array:
  """(C, embed_dim) unnormalised embeddings of packed prompts, in the prompts' original order;
  `options` are those of `model.encode_texts` (adapter, dropout, dtype, ...)."""
  return model.encode_texts(params, packed.token_ids, config, positions=packed.positions,
                            ends=packed.ends, **options)
