"""Few-shot training of CLIP (CLIP-LoRA, Block-LoRA, LLU), driven by an ml_collections config file.

  python train.py --config configs/eurosat_16shot.py --workdir runs/eurosat_16shot
  python train.py --config configs/fewshot.py:dataset=dtd,shots=4,seed=2 --workdir runs/dtd \\
      --config.lora.rank=4
  python train.py --config configs/block_lora.py --workdir runs/eurosat_block_lora
  python train.py --config configs/llu.py --workdir runs/eurosat_llu
  python train.py --config configs/llu.py --helpfull   # every flag and config key

The workdir receives `adapter.safetensors`, `results.json`, `metrics.jsonl`, TensorBoard events
and orbax checkpoints, and belongs to one run: re-running the same command resumes from the last
checkpoint (or, once finished, prints the results), another config there is refused unless
--overwrite replaces that run.
"""

import functools
import os
import sys

# pylint: disable=wrong-import-position
from clip_lora_jax import cli

cli.silence_library_noise(sys.argv)  # Before TensorFlow and transformers are imported.

from absl import app, flags
from ml_collections import config_flags

from clip_lora_jax.errors import exit_on_user_error

config_flags.DEFINE_config_file(
    "config", None, "Config file (e.g. configs/fewshot.py:dataset=dtd,shots=4,seed=2); any value "
    "can be overridden with --config.KEY=VALUE (--helpfull lists every key).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results (shared by "
                    "all processes of a multi-host run); it holds one run.")
flags.DEFINE_bool("overwrite", False, "Replace the run the workdir holds (its checkpoints, "
                  "metrics, adapter and results) instead of refusing another config there.")
flags.DEFINE_bool("distributed", False, "Multi-host run whose peers JAX finds itself (TPU pod "
                  "slices, Slurm): calls jax.distributed.initialize() with no arguments.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs elsewhere: host:port of "
                    "process 0 (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id.")
flags.mark_flags_as_required(["config", "workdir"])

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "fewshot.py")


def main(argv):
  f = cli.start(argv)
  with exit_on_user_error():
    # JAX, TensorFlow and the methods load only now: --help and flag errors answer in a second.
    with cli.quiet_imports(sys.argv):
      import jax  # pylint: disable=import-outside-toplevel
      from clip_lora_jax import methods, sharding  # pylint: disable=import-outside-toplevel
      # TensorFlow comes with TFDS: its C++ import notice is silenced here, whatever the method.
      from clip_lora_jax.data import source  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                                    auto=f.distributed)
    results = methods.train_and_evaluate(f.config, f.workdir, f.overwrite)
  if jax.process_index() == 0:
    print(f"test top-1 {results['test_top1']:.2f}%  top-5 {results['test_top5']:.2f}%  "
          f"({results['test_count']} images) -> {f.workdir}/results.json")


if __name__ == "__main__":
  app.run(main, flags_parser=functools.partial(cli.parse_flags_or_exit,
                                               default_config=DEFAULT_CONFIG))
