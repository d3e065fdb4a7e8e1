"""python -m clip_lora_jax.sweep: runs a sweep's cells, then writes its tables and plots.

  python -m clip_lora_jax.sweep --methods lora,tip_adapter_f --datasets all \\
      --shots 1,2,4,8,16 --seeds 1,2,3 --protocol fewshot --root runs/paper
  python -m clip_lora_jax.sweep --methods lora --protocol base_to_novel,cross_dataset,domain_shift \\
      --seeds 1,2,3 --root runs/paper --executor submitit --slurm partition=gpu \\
      --slurm timeout_min=720
"""

from __future__ import annotations

import argparse
import sys

from clip_lora_jax.errors import UserError, exit_on_user_error
from clip_lora_jax.sweep import protocols, runner

ALIASES = {"clip_lora": "lora"}


def _names(text: str, known: tuple[str, ...], what: str, aliases=None) -> list[str]:
  """A comma-separated list of `known` names ("all": every one)."""
  if text == "all":
    return list(known)
  names = [(aliases or {}).get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise UserError(f"--{what} {text!r}: unknown {', '.join(unknown) or 'empty list'}; use "
                    f"'all' or some of {', '.join(known)}")
  return names


def _ints(text: str | None, what: str) -> list[int] | None:
  if text is None:
    return None
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 0:
    raise UserError(f"--{what} {text!r}: expected comma-separated non-negative integers")
  return values


def _value(text: str) -> object:
  """A --slurm value: an int when it reads as one."""
  return int(text) if text.lstrip("-").isdigit() else text


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m clip_lora_jax.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default="all", help="comma-separated registry methods, or all")
  p.add_argument("--datasets", default="all", help="comma-separated benchmark datasets, or all")
  p.add_argument("--shots", help="comma-separated shots (default: 1,2,4,8,16 for fewshot, 16 "
                 "for the generalisation protocols)")
  p.add_argument("--seeds", default="1,2,3")
  p.add_argument("--protocol", default="fewshot",
                 help=f"comma-separated, of {', '.join(protocols.PROTOCOLS)}, or all")
  p.add_argument("--source", default=protocols.SOURCE,
                 help="the training dataset of cross_dataset and domain_shift")
  p.add_argument("--targets", default=",".join(protocols.registry.DOMAIN_SHIFT_NAMES),
                 help="domain_shift test sets")
  p.add_argument("--root", required=True, help="the sweep's directory (workdirs, store, tables)")
  p.add_argument("--config_file", help="one config file for every method, given :method=NAME "
                 "(e.g. configs/runlocal.py); default: each method's own recipe")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override of every cell (--config.KEY=VALUE), repeatable")
  p.add_argument("--split_files", metavar="DIR",
                 help="a directory of the protocol's split_zhou_<Dataset>.json files: each "
                 "dataset split by one runs on its exact lists (Food-101 cannot: TFDS keeps no "
                 "file names)")
  p.add_argument("--shot_lists", metavar="DIR",
                 help="published few-shot lists, shot_<K>-seed_<S>.json or CoOp's .pkl, in DIR "
                 "where {dataset} stands for the dataset name (e.g. coop/{dataset}/split_fewshot)")
  p.add_argument("--executor", default="local", choices=runner.EXECUTORS)
  p.add_argument("--devices", type=int, help="local executor: cells at a time (default: one "
                 "per visible GPU, else 1)")
  p.add_argument("--cluster", default="slurm", choices=("slurm", "local"),
                 help="submitit executor: Slurm, or submitit's local executor")
  p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                 help="submitit parameter, repeatable: partition=..., timeout_min=..., "
                 "gpus_per_node=..., array_parallelism=... (slurm_ is added where needed)")
  p.add_argument("--dry_run", action="store_true", help="print the cells' commands, run nothing")
  p.add_argument("--std", action="store_true", help="tables show mean ± std over seeds")
  return p.parse_args(argv)


def submitit_parameters(pairs: list[str], cluster: str) -> dict[str, object]:
  """--slurm KEY=VALUE pairs -> submitit's `update_parameters` keywords; Slurm cells get one
  GPU each unless told otherwise."""
  generic = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node",
             "tasks_per_node", "name", "stderr_to_stdout"}
  parameters: dict[str, object] = {"gpus_per_node": 1} if cluster == "slurm" else {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise UserError(f"--slurm {pair!r}: expected KEY=VALUE")
    parameters[key if key in generic or key.startswith("slurm_") else f"slurm_{key}"] = \
        _value(value)
  return parameters


def main(argv: list[str]) -> int:
  from clip_lora_jax import methods  # pylint: disable=import-outside-toplevel
  from clip_lora_jax.sweep import report  # pylint: disable=import-outside-toplevel
  args = parse(argv)
  names = _names(args.methods, tuple(methods.METHODS), "methods", ALIASES)
  datasets = _names(args.datasets, protocols.registry.DATASET_NAMES, "datasets")
  seeds = _ints(args.seeds, "seeds")
  cells = []
  for protocol in _names(args.protocol, protocols.PROTOCOLS, "protocol"):
    shots = _ints(args.shots, "shots") or list(protocols.DEFAULT_SHOTS[protocol])
    targets = _names(args.targets, protocols.registry.DOMAIN_SHIFT_NAMES, "targets")
    source = _names(args.source, protocols.registry.DATASET_NAMES, "source")[0]
    cells += protocols.grid(protocol, names, datasets, shots, seeds, source, targets)
  settings = runner.Settings(args.root, args.config_file, tuple(args.set),
                             split_files=args.split_files, shot_lists=args.shot_lists)
  if args.dry_run:
    for cell in dict.fromkeys(cells):
      print(" ".join(runner.job(settings, cell).command))
    return 0
  slots = [{}] * args.devices if args.devices else None
  records = runner.run(cells, settings, args.executor, slots, args.cluster,
                       submitit_parameters(args.slurm, args.cluster))
  for path in report.write(args.root, args.std):
    print(f"wrote {path}")
  failed = [r for r in records.values() if r["status"] == "failed"]
  for r in failed:
    print(f"FAILED {r['key']}: {r['reason']} (log {r['log']})", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  with exit_on_user_error():
    sys.exit(main(sys.argv[1:]))
