"""python -m clip_lora_jax.sweep.report --root DIR: the tables (`root/tables`) and plots
(`root/plots`) of a sweep, from its store alone (nothing runs)."""

from __future__ import annotations

import argparse
import sys

from clip_lora_jax.errors import exit_on_user_error
from clip_lora_jax.sweep import plots, tables


def write(root: str, std: bool = False, published: bool = True) -> list[str]:
  """Every table and plot of the store in `root`; the paths written."""
  return tables.write(root, std) + plots.write(root, published)


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m clip_lora_jax.sweep.report", description=__doc__)
  p.add_argument("--root", required=True)
  p.add_argument("--std", action="store_true", help="tables show mean ± std over seeds")
  p.add_argument("--no_published", action="store_true",
                 help="plots without the published CLIP-LoRA numbers (dashed)")
  args = p.parse_args(argv)
  for path in write(args.root, args.std, not args.no_published):
    print(f"wrote {path}")


if __name__ == "__main__":
  with exit_on_user_error():
    main(sys.argv[1:])
