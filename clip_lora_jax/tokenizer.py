"""CLIP's text tokenizer, offline by default and id-for-id equal to OpenAI's.

The byte-pair encoding runs in Hugging Face `tokenizers` (through `transformers.CLIPTokenizer`),
built either from the BPE vocabulary shipped in `clip_lora_jax/assets` or from the tokenizer files
of a checkpoint directory. Text is cleaned first exactly as OpenAI's reference tokenizer does
(ftfy, HTML unescaping, whitespace collapsing, lower-casing), because the normaliser of
`transformers` alone differs on curly quotes, full-width forms, HTML entities and final sigma.
Sequences are laid out as OpenAI's `clip.tokenize`: start token, text, end token, zeros up to the
context length, and over-long texts cut to the context length with the last id set to the end token.
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import importlib.resources
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import transformers

from clip_lora_jax.errors import UserError

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
DEFAULT_CONTEXT_LENGTH = 77

_VOCAB_ASSET = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 byte symbols, the same 256 ending a word, 48,894 merges, 2 special tokens.
_NUM_BYTES = 256
_CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = _CLIP_VOCAB_SIZE - 2 * _NUM_BYTES - 2
# Files that make a checkpoint directory carry its own tokenizer (either is enough).
_CHECKPOINT_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def byte_symbols() -> list[str]:
  """The printable character standing for each byte in byte-level BPE, in vocabulary order.

  Printable Latin-1 bytes stand for themselves and come first; every other byte b is mapped, in
  increasing order, to chr(256 + k) for the k-th such byte. This is the GPT-2 / CLIP convention
  that the `tokenizers` ByteLevel pre-tokenizer also uses.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = sorted(set(range(_NUM_BYTES)) - set(printable))
  return [chr(b) for b in printable] + [chr(_NUM_BYTES + k) for k in range(len(others))]


def clip_vocabulary(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Builds CLIP's token -> id table and merge list from the text of `bpe_simple_vocab_16e6.txt`.

  The file holds a header line then merge rules `left right`, most frequent first; CLIP keeps
  the first 48,894. Ids follow OpenAI's order: byte symbols, byte symbols ending a word (`</w>`),
  one token per merge, then the start and end tokens (49406 and 49407).
  """
  lines = bpe_text.split("\n")[1:1 + _NUM_MERGES]
  merges = [tuple(line.split()) for line in lines]
  if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"not a CLIP BPE merges file: expected {_NUM_MERGES} `left right` lines")
  symbols = byte_symbols()
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += [START_TOKEN, END_TOKEN]
  return {token: i for i, token in enumerate(tokens)}, merges


def clean_text(text: str) -> str:
  """OpenAI CLIP's text normalisation: fix mojibake and unicode forms, unescape HTML, collapse
  whitespace, lower-case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return " ".join(text.split()).lower()


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Turns texts into fixed-length CLIP token id arrays.

  Attributes:
    backend: the `transformers.CLIPTokenizer` doing the byte-pair encoding.
    context_length: the length of every returned id row (77 for all released CLIP models).
  """
  backend: transformers.CLIPTokenizer
  context_length: int = DEFAULT_CONTEXT_LENGTH

  @property
  def sot_token_id(self) -> int:
    """Id of the start-of-text token (49406 in CLIP), first in every row."""
    return self.backend.convert_tokens_to_ids(START_TOKEN)

  @property
  def eot_token_id(self) -> int:
    """Id of the end-of-text token (49407 in CLIP), the largest id: text pooling uses argmax."""
    return self.backend.convert_tokens_to_ids(END_TOKEN)

  @property
  def vocab_size(self) -> int:
    """Number of token ids (49408 in CLIP), i.e. the rows of the token embedding."""
    return len(self.backend)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Tokenizes `texts` (a single `str` counts as one text) into int32 ids of shape
    (len(texts), context_length), zero-padded; too long texts are cut and end with the end token."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = np.zeros((len(texts), self.context_length), np.int32)
    if not texts:
      return ids
    encodings = self.backend.backend_tokenizer.encode_batch(
        [clean_text(t) for t in texts], add_special_tokens=False)
    sot, eot = self.sot_token_id, self.eot_token_id
    for row, encoding in zip(ids, encodings):
      tokens = [sot, *encoding.ids, eot][:self.context_length]
      tokens[-1] = eot
      row[:len(tokens)] = tokens
    return ids


def load_tokenizer(checkpoint_dir: str | None = None,
                   context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
  """Returns CLIP's tokenizer, offline.

  Args:
    checkpoint_dir: a checkpoint directory; its tokenizer files (`tokenizer.json` or
      `vocab.json` + `merges.txt`, Hugging Face layout) are used when present, otherwise the BPE
      vocabulary shipped with this package is. None: the shipped vocabulary.
    context_length: length of the id rows (the text tower's number of positions).
  """
  if context_length < 2:
    raise UserError(f"context_length={context_length} is too small: a CLIP text needs at least "
                    "the start and end tokens, so pass 2 or more (77 for released CLIP models).")
  if checkpoint_dir is not None and not os.path.isdir(checkpoint_dir):
    raise UserError(f"tokenizer: checkpoint directory {checkpoint_dir!r} does not exist; pass an "
                    "existing directory, or None to use the vocabulary shipped with clip_lora_jax.")
  if checkpoint_dir is not None and any(
      os.path.exists(os.path.join(checkpoint_dir, f)) for f in _CHECKPOINT_TOKENIZER_FILES):
    source = f"the tokenizer files in {checkpoint_dir!r}"
    try:
      backend = transformers.CLIPTokenizer.from_pretrained(checkpoint_dir)
    except (OSError, ValueError, TypeError) as e:
      raise UserError(f"could not read {source} ({e}); fix or remove them to fall back to the "
                      "vocabulary shipped with clip_lora_jax.") from e
  else:
    source = f"the shipped vocabulary {_VOCAB_ASSET}"
    backend = _shipped_backend()
  tokenizer = Tokenizer(backend, context_length)
  _check_tokenizer(tokenizer, source)
  return tokenizer


def _shipped_backend() -> transformers.CLIPTokenizer:
  """A `transformers.CLIPTokenizer` built from the BPE vocabulary in `clip_lora_jax/assets`."""
  asset = importlib.resources.files("clip_lora_jax") / "assets" / _VOCAB_ASSET
  with asset.open("rb") as f:
    vocab, merges = clip_vocabulary(gzip.decompress(f.read()).decode("utf-8"))
  # Files must be passed as `vocab=` / `merges=` objects: transformers 5 silently ignores
  # `vocab_file=` / `merges_file=` and builds a 3-token vocabulary (caught by _check_tokenizer).
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _check_tokenizer(tokenizer: Tokenizer, source: str) -> None:
  """Raises UserError unless `tokenizer` is a usable CLIP tokenizer: a real byte-level vocabulary
  with start and end tokens, the end token being the largest id (text pooling takes argmax)."""
  size = tokenizer.vocab_size
  if size < 2 * _NUM_BYTES + 2:
    raise UserError(
        f"{source} gave a tokenizer with only {size} tokens, not a CLIP vocabulary (49408). "
        "With transformers 5, build CLIPTokenizer from `vocab=`/`merges=` or "
        "`from_pretrained(dir)`; `vocab_file=`/`merges_file=` are silently ignored.")
  if None in (tokenizer.sot_token_id, tokenizer.eot_token_id) or (
      tokenizer.sot_token_id == tokenizer.eot_token_id):
    raise UserError(f"{source}: the vocabulary lacks distinct start and end tokens; use CLIP's "
                    f"tokenizer files (with {START_TOKEN} and {END_TOKEN}).")
  if tokenizer.eot_token_id != size - 1:
    raise UserError(
        f"{source}: the end token {END_TOKEN} has id {tokenizer.eot_token_id}, not the largest id "
        f"{size - 1}; CLIP pools text at the largest id, so remove the added tokens or use CLIP's "
        "original tokenizer files.")
