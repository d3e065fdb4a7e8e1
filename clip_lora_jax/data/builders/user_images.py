"""TFDS builder `user_images`: a dataset of the user's own images, listed in its builder config.

A `folder:` or `csv:` dataset (see `clip_lora_jax/data/user_datasets.py`, which lists and checks
the files) becomes one config of this builder: its name is a digest of the listing (every file's
path, size, modification time, class and split), so the prepared TFDS data, and every cache keyed
by it (catalogs, few-shot sets), is another one as soon as a file is added, removed or changed.

TFDS splits are `train` (every image, when the user gives no split: the registry carves it) or
`train`, `test` and optionally `validation`. Examples are stored unshuffled, in the listing's
order (class, then file name), so that TFDS's canonical order, and with it every split carved from
it, is a pure function of the file list. Each image is stored as its file's bytes, after a decode
with the input pipeline's own decoder: a damaged file stops the preparation with its name.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping

import tensorflow_datasets as tfds

from clip_lora_jax import files
from clip_lora_jax.errors import UserError

NAME = "user_images"
# One example: (file name as the user wrote it, absolute path, label).
Example = tuple[str, str, int]


@dataclasses.dataclass(eq=False)
class UserImagesConfig(tfds.core.BuilderConfig):
  """The images of one user dataset.

  Attributes:
    name: a digest of the listing (see the module docstring).
    description: the dataset's name (`folder:/root` or `csv:/file.csv`), for messages.
    classes: class folder names (or CSV labels), in label order.
    examples: TFDS split -> its examples, in canonical order.
  """
  classes: tuple[str, ...] = ()
  examples: Mapping[str, tuple[Example, ...]] = dataclasses.field(default_factory=dict)


def default_data_dir() -> str:
  """Where user datasets are prepared when no data_dir is given: `<cache dir>/tfds`."""
  return os.path.join(files.default_cache_dir(), "tfds")


class UserImages(tfds.core.GeneratorBasedBuilder):
  """The user's own images, as one `UserImagesConfig` lists them."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"The images of {self.builder_config.description}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=self.builder_config.classes),
            "file_name": tfds.features.Text(),  # e.g. "cat/1.jpg", or the CSV's path
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # canonical order = listing order
    )

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and where it was prepared;
  # nothing is downloaded here, and `prepared_builder` says where it prepares.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the files are where the listing says.
    return {split: self._generate_examples(examples)
            for split, examples in self.builder_config.examples.items()}

  def _generate_examples(self, examples: tuple[Example, ...]):
    # The pipeline's decoder (TensorFlow, like the rest of preparation), imported only here.
    from clip_lora_jax.data import preprocessing  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    for position, (file_name, path, label) in enumerate(examples):
      try:
        with open(path, "rb") as f:
          encoded = f.read()
        preprocessing.decode_image(tf.constant(encoded))
      except (OSError, tf.errors.InvalidArgumentError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it does not decode"
        raise UserError(f"{self.builder_config.description}: cannot read image {path} "
                        f"({reason}); fix or remove it") from None
      yield position, {"image": encoded, "label": label, "file_name": file_name}


def prepared_builder(config: UserImagesConfig, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of `config` in `data_dir` (`default_data_dir()` when None), prepared first if it
  is not yet (seconds for a few hundred images; TFDS removes a failed preparation)."""
  builder = tfds.builder(NAME, config=config, data_dir=data_dir or default_data_dir())
  if not builder.is_prepared():
    count = sum(map(len, config.examples.values()))
    print(f"preparing {config.description} ({count} images) in {builder.data_dir}",
          file=sys.stderr)
    builder.download_and_prepare()
  return builder
