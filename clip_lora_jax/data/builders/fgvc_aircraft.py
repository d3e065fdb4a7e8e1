"""TFDS builder `fgvc_aircraft`: FGVC-Aircraft 2013b at the variant level, official splits.

TFDS has no FGVC-Aircraft, so this builder prepares it from the official archive put into the
TFDS manual directory, either as downloaded (`fgvc-aircraft-2013b.tar.gz`) or extracted (the
`fgvc-aircraft-2013b/` folder). The archive holds

  fgvc-aircraft-2013b/data/
    images/<image id>.jpg
    variants.txt                          the 100 variant names, one a line: the label order
    images_variant_{train,val,test}.txt   "<image id> <variant name>" lines (3,334 / 3,333 / 3,333)

TFDS splits `train`, `validation`, `test` are the official ones, as in the CoOp protocol. Images
are kept as they are, the copyright banner at their bottom included, as the protocol does.
Examples are stored unshuffled, in the order of their list file: the reference code samples its
few-shot sets from these lists in file order, which TFDS's canonical order then reproduces.
"""

from __future__ import annotations

import importlib.resources

from etils import epath
import tensorflow_datasets as tfds

from clip_lora_jax.errors import UserError

ARCHIVE = "fgvc-aircraft-2013b.tar.gz"
FOLDER = "fgvc-aircraft-2013b"
URL = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
MANUAL_FILES = f"{ARCHIVE} (from {URL}), as downloaded or extracted into {FOLDER}/"
# TFDS split -> name of the official image list.
_LISTS = {"train": "train", "validation": "val", "test": "test"}


def variant_names() -> list[str]:
  """The 100 variants in the order of the archive's `variants.txt` (label order)."""
  text = importlib.resources.files("clip_lora_jax.data").joinpath(
      "assets", "fgvc_aircraft_variants.txt").read_text()
  return text.splitlines()


def _data_folder(dl_manager: tfds.download.DownloadManager) -> epath.Path:
  """The archive's `data/` folder, extracting the archive if it was put there as downloaded."""
  manual = dl_manager.manual_dir
  root = dl_manager.extract(manual / ARCHIVE) if (manual / ARCHIVE).exists() else manual
  data = root / FOLDER / "data"
  if not (data / "variants.txt").exists():
    raise UserError(f"FGVC-Aircraft: {data / 'variants.txt'} not found; put {MANUAL_FILES} "
                    f"into {manual}")
  variants = (data / "variants.txt").read_text().splitlines()
  if variants != variant_names():
    raise UserError(f"FGVC-Aircraft: {data / 'variants.txt'} does not list the 100 variants of "
                    "the 2013b release; use the official fgvc-aircraft-2013b archive")
  return data


class FgvcAircraft(tfds.core.GeneratorBasedBuilder):
  """FGVC-Aircraft 2013b, 100 variants, from a manual download."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: variant labels, official train / val / test.",
                   "1.1.0": "Examples in the order of the official lists (not shuffled)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {MANUAL_FILES} into the manual directory."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="FGVC-Aircraft 2013b: 10,000 aircraft images, 100 variants.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=variant_names()),
            "file_name": tfds.features.Text(),  # e.g. "1025794.jpg"
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # canonical order = list order, keyed by line number
        homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        citation="Maji et al., Fine-Grained Visual Classification of Aircraft, arXiv:1306.5151.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    data = _data_folder(dl_manager)
    return {split: self._generate_examples(data, name) for split, name in _LISTS.items()}

  def _generate_examples(self, data: epath.Path, list_name: str):
    lines = (data / f"images_variant_{list_name}.txt").read_text().splitlines()
    for line_number, line in enumerate(lines):
      if not line.strip():
        continue
      image_id, variant = line.strip().split(" ", 1)
      file_name = f"{image_id}.jpg"
      yield line_number, {"image": data / "images" / file_name, "label": variant,
                          "file_name": file_name}
