"""TFDS builder `ucf101_midframes`: the middle frame of every UCF-101 clip, split 1.

TFDS's `ucf101` holds videos; the CoOp protocol classifies one image per clip, its middle frame,
as distributed in the protocol's `UCF-101-midframes.zip`. This builder prepares those frames from
the TFDS manual directory, laid out as

  UCF-101-midframes/<Class_Name>/<clip>.jpg    e.g. Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg
  ucfTrainTestlist/classInd.txt                "1 ApplyEyeMakeup" lines: the label order
  ucfTrainTestlist/trainlist01.txt             "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
  ucfTrainTestlist/testlist01.txt              "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

`UCF-101-midframes/` is the extracted zip of the protocol; `ucfTrainTestlist/` is the extracted
official `UCF101TrainTestSplits-RecognitionTask.zip`. A class folder is the CamelCase action name
split into words joined by underscores (the protocol's renaming), and a frame is named after its
clip with `.jpg` for `.avi`. TFDS splits `train` (9,537 frames) and `test` (3,783) follow the
official trainlist01 / testlist01; `file_name` is the frame's path inside `UCF-101-midframes/`,
as in the protocol's `split_zhou_UCF101.json`.
"""

from __future__ import annotations

import importlib.resources
import re

from etils import epath
import tensorflow_datasets as tfds

from clip_lora_jax.errors import UserError

FRAMES = "UCF-101-midframes"
LISTS = "ucfTrainTestlist"
MANUAL_FILES = (f"the middle frames as {FRAMES}/<Class_Name>/<clip>.jpg (the CoOp protocol's "
                f"UCF-101-midframes.zip, extracted) and the official split lists as "
                f"{LISTS}/classInd.txt, trainlist01.txt and testlist01.txt (from "
                "https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip)")
_LISTS = {"train": "trainlist01.txt", "test": "testlist01.txt"}


def actions() -> list[str]:
  """The 101 CamelCase action names in the order of the official `classInd.txt`."""
  text = importlib.resources.files("clip_lora_jax.data").joinpath(
      "assets", "ucf101_actions.txt").read_text()
  return text.splitlines()


def folder_name(action: str) -> str:
  """"ApplyEyeMakeup" -> "Apply_Eye_Makeup", the protocol's folder (and class) name."""
  return "_".join(re.findall("[A-Z][^A-Z]*", action))


def _check_class_index(manual: epath.Path) -> None:
  path = manual / LISTS / "classInd.txt"
  if not path.exists():
    raise UserError(f"UCF-101: {path} not found; put {MANUAL_FILES} into {manual}")
  listed = [line.split()[1] for line in path.read_text().splitlines() if line.strip()]
  if listed != actions():
    raise UserError(f"UCF-101: {path} does not list the 101 actions of the official release")


class Ucf101Midframes(tfds.core.GeneratorBasedBuilder):
  """Middle frames of the UCF-101 clips, official split 1, from a manual download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: middle frames, trainlist01 / testlist01."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {MANUAL_FILES} into the manual directory."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="The middle frame of each UCF-101 clip (13,320 frames, 101 actions).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=[folder_name(a) for a in actions()]),
            # e.g. "Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg"
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.crcv.ucf.edu/data/UCF101.php",
        citation="Soomro et al., UCF101: A Dataset of 101 Human Actions Classes From Videos in "
                 "The Wild, arXiv:1212.0402.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = dl_manager.manual_dir
    _check_class_index(manual)
    return {split: self._generate_examples(manual, name) for split, name in _LISTS.items()}

  def _generate_examples(self, manual: epath.Path, list_name: str):
    for line in (manual / LISTS / list_name).read_text().splitlines():
      if not line.strip():
        continue
      action, clip = line.split()[0].split("/")
      file_name = f"{folder_name(action)}/{clip.replace('.avi', '.jpg')}"
      path = manual / FRAMES / file_name
      if not path.exists():
        raise UserError(f"UCF-101: {list_name} lists {line.split()[0]} but its middle frame "
                        f"{path} is missing; put {MANUAL_FILES} into {manual}")
      yield file_name, {"image": path, "label": folder_name(action), "file_name": file_name}
