"""Prepare a benchmark dataset (or your own images) with TFDS, or show what it holds.

  python -m clip_lora_jax.data prepare NAME [--data_dir D] [--manual_dir M]
  python -m clip_lora_jax.data info NAME [--data_dir D] [--split_file F]
                                   [--shots K [--seed S] [--sampler reference|numpy] [--list]]

NAME is a benchmark, or `folder:/path/to/root` (one folder of images per class) or
`csv:/path/to/file.csv` (columns path,label[,split]); these are prepared on first use under the
cache directory (or --data_dir), and `--class_names_file` names their classes in prompts.

`prepare` downloads and prepares the TFDS data (or, for ImageNet, Stanford Cars, FGVC-Aircraft
and UCF-101, prepares it from files you put into the manual directory, and says which) and then
prints what `info` prints: the class count, a few class names, the templates and the sizes of the
benchmark's train / val / test splits. With `--shots`, `info` also says which sampler a run with
these arguments uses and how many images it chooses; `--list` prints them, one per line: role
(val, then train, in the order drawn), label and path (as in the split file; else TFDS's file
name), tab-separated.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from clip_lora_jax.data import registry, sampling, source, splits
from clip_lora_jax.data.registry import DatasetSpec
from clip_lora_jax.errors import UserError, exit_on_user_error

_SHOWN_CLASSES = 5
_DEFAULT_SEED = 1  # configs/fewshot.py's


def print_choice(spec: DatasetSpec, data_dir: str | None, choice: sampling.Choice, shots: int,
                 seed: int, list_files: bool) -> None:
  """Prints which sampler chose a few-shot set and how many images it holds; with `list_files`,
  the chosen images themselves (see the module docstring)."""
  whose = {sampling.REFERENCE: "the reference code's", sampling.LISTS: "the published list's"
           }.get(choice.sampler, "not the reference's")
  print(f"  {shots}-shot, seed {seed}: sampler {choice.sampler} ({whose} choice), "
        f"{len(choice.train)} train and {len(choice.val)} val images")
  if not list_files:
    return
  tfds_builder = source.builder(spec, data_dir)
  for role, examples in (("val", choice.val), ("train", choice.train)):
    paths = splits.split_file_keys(spec, tfds_builder, examples)
    for position, (label, path) in enumerate(zip(examples.label, paths)):
      print(f"{role}\t{label}\t{path or examples.describe(position)}")


def info(spec: DatasetSpec, data_dir: str | None, split_file: str | None) -> None:
  """Prints the dataset's classes, templates and benchmark split sizes."""
  names = ", ".join(spec.class_names[:_SHOWN_CLASSES])
  tfds_name = spec.tfds_name + (f"/{spec.builder_config.name}" if spec.builder_config else "")
  print(f"{spec.name}: TFDS {tfds_name}, {spec.num_classes} classes ({names}, ...)")
  print(f"  template: {spec.template!r}; CoOp zero-shot template: {spec.coop_template!r}; "
        f"{len(spec.ensemble_templates)} ensemble template(s)")
  for role in registry.ROLES:
    if splits.has_split(spec, role, split_file):
      count = splits.num_examples(spec, role, data_dir, split_file)
      print(f"  {role}: {count} examples")
    else:
      print(f"  {role}: none in the protocol (validation shots come from train)")


def prepare(spec: DatasetSpec, data_dir: str | None, manual_dir: str | None) -> None:
  """Prepares the TFDS data of `spec`, then prints its `info`.

  Datasets TFDS downloads itself are first checked to be reachable (seconds, not TFDS's minutes
  of retries); without network, the UserError says which files to download elsewhere and where
  to put them. A failed preparation removes what it created. The user's own images are prepared
  as every use prepares them (`source.builder`).
  """
  name = spec.name
  if spec.builder_config is not None:
    root = os.fspath(source.builder(spec, data_dir).data_dir_root)
    print(f"prepared {name} in {root}")
    info(spec, root, split_file=None)
    return
  tfds_builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  root = os.fspath(tfds_builder.data_dir_root)
  if spec.manual_download is not None:
    manual_dir = manual_dir or source.default_manual_dir(root)
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
      command = source.prepare_command(spec, root, manual_dir)
      raise UserError(f"{name} needs a manual download: put {spec.manual_download} into "
                      f"{manual_dir}, then run:\n  {command}")
  else:
    check_reachable(spec, tfds_builder, manual_dir or source.default_manual_dir(root))
  downloads = os.path.join(root, "downloads")
  watched = [root, os.path.join(root, spec.tfds_name.split("/")[0]), downloads,
             os.path.join(downloads, "extracted")]
  with removed_on_failure(watched):
    try:
      tfds_builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except OSError as e:  # network failures (requests' errors are OSErrors too)
      raise offline_error(spec, tfds_builder, manual_dir or source.default_manual_dir(root),
                          f"{type(e).__name__}: {e}") from e
  print(f"prepared {spec.tfds_name} in {root}")
  info(spec, root, split_file=None)


def tfds_downloads(tfds_builder: tfds.core.DatasetBuilder) -> dict[str, str]:
  """URL -> file name of what TFDS downloads to prepare the builder (its config's
  `download_url` where it names one, e.g. EuroSAT's RGB archive only)."""
  infos = tfds_builder.url_infos or {}
  url = getattr(tfds_builder.builder_config, "download_url", None)
  if url in infos:
    infos = {url: infos[url]}
  return {u: info.filename or os.path.basename(urllib.parse.urlparse(u).path)
          for u, info in infos.items()}


def offline_error(spec: registry.DatasetSpec, tfds_builder: tfds.core.DatasetBuilder,
                  manual_dir: str, reason: str) -> UserError:
  """The manual route: which files to download on a machine with network, where to put them."""
  files = ", ".join(f"{url} (as {name})" for url, name in tfds_downloads(tfds_builder).items())
  command = source.prepare_command(spec, os.fspath(tfds_builder.data_dir_root), manual_dir)
  return UserError(f"cannot download {spec.name}: {reason}. Without network access, download "
                   f"{files} on a machine that has it, put them into {manual_dir} and run "
                   f"`{command}`")


def check_reachable(spec: registry.DatasetSpec, tfds_builder: tfds.core.DatasetBuilder,
                    manual_dir: str, timeout: float = 10.0) -> None:
  """Raises `offline_error` when a file TFDS would download (one not in `manual_dir` already)
  cannot be reached: one HEAD request each, no retries, `timeout` seconds per connection step.
  An HTTP error status means the host answered: TFDS then has its say."""
  for url, name in tfds_downloads(tfds_builder).items():
    if os.path.exists(os.path.join(manual_dir, name)):
      continue
    try:
      urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
      pass
    except OSError as e:  # URLError (no route, no name resolution), timeouts
      host = urllib.parse.urlparse(url).netloc
      raise offline_error(spec, tfds_builder, manual_dir,
                          f"{host} cannot be reached ({getattr(e, 'reason', e)})") from e


@contextlib.contextmanager
def removed_on_failure(directories: Sequence[str]) -> Iterator[None]:
  """If the block fails, removes what it created in `directories`: each one it created, and the
  new entries of those that existed (TFDS leaves partial folders that warn later)."""
  before = {d: set(os.listdir(d)) if os.path.isdir(d) else None for d in directories}
  try:
    yield
  except BaseException:
    for directory, entries in before.items():
      if entries is None:
        created = [directory]
      elif os.path.isdir(directory):
        created = [os.path.join(directory, e) for e in set(os.listdir(directory)) - entries]
      else:
        created = []
      for path in created:
        if os.path.isdir(path):
          shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
          os.remove(path)
    raise


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m clip_lora_jax.data", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"datasets: {', '.join(registry.DATASET_NAMES)}, folder:/path/to/images, "
             "csv:/path/to/file.csv")
  commands = parser.add_subparsers(dest="command", required=True)
  data_dir_help = ("TFDS data directory (default: TFDS's, ~/tensorflow_datasets; for folder: and "
                   "csv: datasets, the cache directory's tfds/)")
  name_help = "a benchmark dataset, folder:/path/to/images or csv:/path/to/file.csv"
  class_names_help = ("folder: and csv: datasets: a JSON object {class folder or label: name in "
                      "prompts} (default: folder names, underscores as spaces)")
  prepare_parser = commands.add_parser(
      "prepare", help="download and prepare a dataset with TFDS",
      description="Download and prepare a dataset with TFDS, then print its info.")
  prepare_parser.add_argument("name", metavar="NAME", help=name_help)
  prepare_parser.add_argument("--data_dir", help=data_dir_help)
  prepare_parser.add_argument("--class_names_file", help=class_names_help)
  prepare_parser.add_argument(
      "--manual_dir", help="folder holding manually downloaded files (imagenet, stanford_cars, "
      "fgvc_aircraft, ucf101; default: DATA_DIR/downloads/manual)")
  info_parser = commands.add_parser(
      "info", help="print class count, class names and split sizes",
      description="Print a dataset's class count, a few class names, its templates and the "
                  "sizes of its benchmark splits (a benchmark must be prepared; folder: and csv: "
                  "datasets are prepared on first use).")
  info_parser.add_argument("name", metavar="NAME", help=name_help)
  info_parser.add_argument("--data_dir", help=data_dir_help)
  info_parser.add_argument("--class_names_file", help=class_names_help)
  info_parser.add_argument("--split_file", help="a split_zhou_<Dataset>.json of the CoOp protocol")
  info_parser.add_argument("--shots", type=int, metavar="K",
                           help="also choose the K-shot set (and validation shots) of a run")
  info_parser.add_argument("--seed", type=int, metavar="S",
                           help=f"with --shots: the run's seed (default {_DEFAULT_SEED})")
  info_parser.add_argument("--shot_lists", metavar="DIR",
                           help="with --shots: a directory of published shot_<K>-seed_<S>.json "
                                "(or CoOp .pkl) lists to read the shots from")
  info_parser.add_argument("--sampler", choices=sampling.SAMPLERS,
                           help="with --shots: the run's sampler (default: the reference's "
                                "wherever it can be reproduced, as in a run)")
  info_parser.add_argument("--list", action="store_true", dest="list_files",
                           help="with --shots: print the chosen images, one per line")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command == "info" and args.shots is None and (
      args.seed is not None or args.sampler or args.list_files or args.shot_lists):
    parser.error("--seed, --sampler, --shot_lists and --list need --shots")
  with exit_on_user_error():
    spec = registry.get_dataset(args.name, args.class_names_file)
    if args.command == "prepare":
      prepare(spec, args.data_dir, args.manual_dir)
    else:
      seed = _DEFAULT_SEED if args.seed is None else args.seed
      choice = None  # chosen first, so that a bad request prints nothing but its error
      if args.shots is not None:
        choice = sampling.choose(spec, args.shots, seed, args.data_dir, args.split_file,
                                 sampler=args.sampler, shot_lists=args.shot_lists)
      info(spec, args.data_dir, args.split_file)
      if choice is not None:
        print_choice(spec, args.data_dir, choice, args.shots, seed, args.list_files)


if __name__ == "__main__":
  main(sys.argv[1:])
