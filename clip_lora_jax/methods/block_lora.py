"""Block-LoRA (Zhou et al., "One Head Eight Arms: Block Matrix based Low Rank Adaptation for
CLIP-based Few-Shot Learning", arXiv 2501.16720): LoRA whose low-rank factors are cut into
`blocks` sub-matrices that share one down-projection A_s.

The paper's method section was not available to us, so both readings of the partition are
implemented (`split`); the update of every adapted projection, with n = `blocks`, is

* 'input' (default): the input features are cut into n equal chunks that share A_s of shape
  (in/n, r): update(x) = scale * ((x_1 + ... + x_n) @ A_s) @ B, with B of shape (r, out). The
  n products x_i @ A_s of plain LoRA become n - 1 additions and one product 1/n the size. It is
  a rank-r update, equal to LoRA with a = tile(A_s, (n, 1)): `model.Dense` reads an `a` with
  fewer rows than its input exactly so (`model.sum_input_chunks`), and `lora.merge` tiles it.
* 'rank': the rank is cut into n blocks: update(x) = scale * (x @ A_s) @ (B_1 + ... + B_n) with
  A_s of shape (in, r/n) and each B_i of shape (r/n, out), stored as one (n, r/n, out) array.
  This equals a rank-r/n LoRA whose up-projection is the sum of the B_i (`pairs` computes it
  inside the loss, so each B_i gets its gradient). Every B_i receives the same gradient, so from
  the zero start they stay equal: the method trains as rank-r/n LoRA whose B moves n times as
  fast. That is why 'input' is the default: it keeps rank r with 1/n of the down-projection.

Both have r * in / n + r * out trainable parameters per projection, against LoRA's
r * (in + out). Initialisation (kaiming-uniform A_s, zero B) starts training exactly at CLIP;
towers, matrices, layer sets, rank, alpha, scaling and dropout are LoRA's (`lora.LoRAConfig`),
and so are the merge, the train step and the adapter files.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from clip_lora_jax import lora
from clip_lora_jax.errors import UserError
from clip_lora_jax.model import Params

SPLITS = ("input", "rank")


@dataclasses.dataclass(frozen=True)
class BlockLoRAConfig(lora.LoRAConfig):
  """LoRA's options plus the partition: `blocks` sub-matrices sharing A_s, cut along `split`.

  8 blocks (the "eight arms" of the paper's title) on the input split by default.
  """
  method: ClassVar[str] = "block_lora"

  blocks: int = 8
  split: str = "input"

  def __post_init__(self):
    super().__post_init__()
    if self.split not in SPLITS:
      raise UserError(f"lora.split={self.split!r}: use 'input' (chunks of the input features "
                      "share A_s) or 'rank' (the rank is cut into blocks)")
    if self.blocks <= 0:
      raise UserError(f"lora.blocks={self.blocks}: must be a positive integer")
    if self.split == "rank" and self.rank % self.blocks:
      raise UserError(f"lora.blocks={self.blocks} does not divide lora.rank={self.rank}: the "
                      "rank split needs rank = blocks x (rank per block); raise the rank or use "
                      "split='input'")

  def factor_shapes(self, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in/n, r) and (r, out) for the input split; (in, r/n), (n, r/n, out) for the rank split."""
    n = self.blocks
    if self.split == "rank":
      return (width, self.rank // n), (n, self.rank // n, width)
    if width % n:
      raise UserError(f"lora.blocks={n} does not divide the tower width {width}: the input split "
                      "cuts the input features into equal chunks; choose a divisor of the width")
    return (width // n, self.rank), (self.rank, width)

  def pairs(self, adapter: Params) -> Params:
    """Input split: the factors as they are. Rank split: a = A_s and b = B_1 + ... + B_n."""
    if self.split == "input":
      return adapter
    return _map_pairs(lambda pair: {"a": pair["a"], "b": pair["b"].sum(axis=0)}, adapter)


def _map_pairs(fn, tree: Params) -> Params:
  """`tree` with every {'a', 'b'} leaf-pair replaced by fn(pair)."""
  if "a" in tree and "b" in tree:
    return fn(tree)
  return {k: _map_pairs(fn, v) for k, v in tree.items()}

