"""Tokenizer tests: ids equal to OpenAI's reference tokenizer, layout, checkpoint files, errors.

The reference is `SimpleTokenizer` from open_clip's `tokenizer.py` (OpenAI's CLIP tokenizer,
pure Python). The open_clip package `__init__` imports torchvision, which may not fit the
installed torch here (tests/conftest.py), so the test loads that one module from the installed
open-clip-torch distribution by file path (the test extra installs open-clip-torch; the module
itself needs ftfy, regex, numpy and torch).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import types

import numpy as np
import pytest

from clip_lora_jax import tokenizer as tokenizer_lib
from clip_lora_jax.errors import UserError

# A few class names of each of the 11 benchmark datasets, in the benchmark's naming convention.
CLASS_NAMES = {
    "imagenet": ["tench", "great white shark", "cock", "African bush elephant", "jack-o'-lantern",
                 "Christmas stocking", "yellow lady's slipper", "toilet paper", "hen-of-the-woods"],
    "caltech101": ["face", "leopard", "motorbike", "airplane", "accordion", "dalmatian",
                   "yin_yang", "inline_skate", "water_lilly"],
    "oxford_pets": ["abyssinian", "american bulldog", "american pit bull terrier", "bengal",
                    "great pyrenees", "japanese chin", "staffordshire bull terrier", "sphynx"],
    "stanford_cars": ["2012 Tesla Model S Sedan", "2012 BMW M3 Coupe",
                      "1991 Volkswagen Golf Hatchback",
                      "2012 Mercedes-Benz Sprinter Van", "2007 Chevrolet Express Cargo Van",
                      "2012 Rolls-Royce Phantom Drophead Coupe Convertible", "2009 Spyker C8 Coupe",
                      "2012 Ram C/V Cargo Van Minivan", "2007 Ford F-150 Regular Cab"],
    "oxford_flowers": ["pink primrose", "hard-leaved pocket orchid", "sweet pea",
                       "bishop of llandaff", "king protea", "black-eyed susan", "bird of paradise",
                       "mexican aster", "ruby-lipped cattleya"],
    "food101": ["apple pie", "baby back ribs", "crème brûlée", "eggs benedict", "pho",
                "takoyaki", "huevos rancheros", "spaghetti carbonara", "macarons"],
    "fgvc_aircraft": ["707-320", "727-200", "737-800", "747-400", "A300B4", "A340-500",
                      "BAE 146-200", "Cessna 172", "DHC-1", "F/A-18", "Falcon 2000", "MD-11",
                      "Tu-154", "Yak-42"],
    "sun397": ["abbey", "outdoor apartment building", "indoor apse", "airport terminal",
               "indoor badminton court", "exterior balcony", "cultivated field",
               "fastfood restaurant", "indoor jacuzzi", "water moat", "outdoor synagogue"],
    "dtd": ["banded", "blotchy", "braided", "bubbly", "crosshatched", "crystalline", "zigzagged",
            "polka-dotted", "honeycombed"],
    "eurosat": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                "Industrial Buildings", "Pasture Land", "Permanent Crop Land",
                "Residential Buildings", "River", "Sea or Lake"],
    "ucf101": ["Apply Eye Makeup", "Apply Lipstick", "Band Marching", "Biking", "Blowing Candles",
               "Handstand Pushups", "Jumping Jack", "Playing Daf", "Yo Yo"],
}
TEMPLATES = ["a photo of a {}.", "a photo of a {}, a type of aircraft.", "{} texture.",
             "a centered satellite photo of {}.", "a photo of a person doing {}."]

PUNCTUATION = ["Hello, world!", "what's up? it's 5 o'clock...", "(parentheses) [brackets] {braces}",
               "semi;colon: dash--dash -- em—dash", "a/b\\c|d", "#hash @at $5.00 100% & more",
               "“curly quotes” and ‘single’", "don't can't we'll they're I'm you've she'd"]
UNICODE = ["café crème brûlée", "naïve façade Ångström", "Straße über Öl",
           "e\u0301 decomposed accent", "东京塔 and 北京", "日本語のテキスト", "한국어 문장",
           "emoji 🐱🐶🚀 and 👩‍👩‍👧 family", "ΟΔΟΣ Greek capitals", "Привет мир",
           "ＦＵＬＬＷＩＤＴＨ text", "ﬁne ligature", "AT&amp;T html entity", "mojibake cafÃ©",
           "Ἀθῆναι"]
WHITESPACE = ["  leading and trailing  ", "tabs\tand\nnewlines\r\n", "many     spaces", "",
              "\u00a0non-breaking\u2009thin space", "   "]
LONG = ["a photo of a " + " ".join(["very"] * 80) + " long name.",
        "supercalifragilisticexpialidocious " * 30,
        "x" * 500]


def all_prompts() -> list[str]:
  names = [name for names in CLASS_NAMES.values() for name in names]
  prompts = [t.format(name.replace("_", " ")) for t in TEMPLATES for name in names]
  return names + prompts + PUNCTUATION + UNICODE + WHITESPACE + LONG


def load_reference_module() -> types.ModuleType:
  """open_clip's tokenizer.py, loaded by path without importing the open_clip package."""
  try:
    dist = importlib.metadata.distribution("open_clip_torch")
  except importlib.metadata.PackageNotFoundError:
    pytest.fail('the reference tokenizer is missing: pip install -e ".[test]"')
  path = dist.locate_file("open_clip/tokenizer.py")
  spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def reference():
  return load_reference_module().SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer() -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.load_tokenizer()


def test_known_ids(tokenizer):
  ids = tokenizer(["a photo of a cat."])
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 269, 49407])
  assert not ids[0, 8:].any()
  assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size,
          tokenizer.context_length) == (49406, 49407, 49408, 77)


def test_shipped_vocabulary_is_openai(tokenizer, reference):
  ours = tokenizer.backend.get_vocab()
  # open_clip renamed the two special tokens; everything else is OpenAI's table.
  theirs = {tokenizer_lib.START_TOKEN if t == "<start_of_text>" else
            tokenizer_lib.END_TOKEN if t == "<end_of_text>" else t: i
            for t, i in reference.encoder.items()}
  assert ours == theirs


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_reference(tokenizer, reference, context_length):
  prompts = all_prompts()
  ours = tokenizer_lib.load_tokenizer(context_length=context_length)(prompts)
  theirs = reference(prompts, context_length=context_length).numpy()
  mismatched = [p for p, a, b in zip(prompts, ours, theirs) if not np.array_equal(a, b)]
  assert not mismatched, f"ids differ from OpenAI's tokenizer on {mismatched}"
  assert (ours[:, -1] != 0).sum() >= len(LONG)  # the long names were truncated


def test_truncation_keeps_end_token(tokenizer):
  ids = tokenizer(LONG + ["short"])
  assert (ids[:len(LONG), -1] == tokenizer.eot_token_id).all()
  assert (ids[:, 0] == tokenizer.sot_token_id).all()
  # The end token is the largest id of every row, where text pooling reads the sequence.
  np.testing.assert_array_equal(ids.argmax(-1), [76] * len(LONG) + [2])


def test_single_string_and_empty_batch(tokenizer):
  np.testing.assert_array_equal(tokenizer("a cat"), tokenizer(["a cat"]))
  assert tokenizer([]).shape == (0, 77)


def test_checkpoint_tokenizer_files_are_used(tokenizer, tmp_path):
  tokenizer.backend.save_pretrained(tmp_path)
  from_dir = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert from_dir.backend is not tokenizer.backend
  prompts = all_prompts()
  np.testing.assert_array_equal(from_dir(prompts), tokenizer(prompts))


def test_directory_without_tokenizer_files_uses_shipped_vocabulary(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  ids = tokenizer_lib.load_tokenizer(str(tmp_path))(["a photo of a cat."])
  np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 269, 49407])


def test_degenerate_vocabulary_raises(tmp_path):
  # What transformers 5 builds from `CLIPTokenizer(vocab_file=..., merges_file=...)`.
  vocab = {tokenizer_lib.START_TOKEN: 0, tokenizer_lib.END_TOKEN: 1}
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(UserError, match=r"only 2 tokens.*vocab_file"):
    tokenizer_lib.load_tokenizer(str(tmp_path))


def test_added_tokens_after_end_token_raise(tokenizer, tmp_path):
  backend = tokenizer_lib.load_tokenizer().backend
  backend.add_tokens(["<new_token>"])
  backend.save_pretrained(tmp_path)
  with pytest.raises(UserError, match=r"end token .* has id 49407, not the largest id 49408"):
    tokenizer_lib.load_tokenizer(str(tmp_path))


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing"))
  with pytest.raises(UserError, match="context_length=1"):
    tokenizer_lib.load_tokenizer(context_length=1)
