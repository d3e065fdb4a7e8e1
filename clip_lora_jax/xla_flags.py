"""XLA and JAX settings that the command lines apply before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first computation creates a backend, and aborts on a flag
it does not know; so flags are tied to the jaxlib versions they were measured with. JAX reads
its `JAX_*` variables when it is imported.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

from clip_lora_jax.files import default_cache_dir

# XLA's CPU backend routes dense layers through YNNPACK fusions by default; on x86 CPUs with
# AVX-512 they run the CLIP train step 1.3x slower and with 2 GiB more memory than its own
# emitters (benchmarks/train_step.py). The flag does nothing on GPU and TPU.
CPU_FLAGS = {"0.10": ("--xla_cpu_experimental_ynn_fusion_type=",)}


def use_fast_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> tuple[str, ...]:
  """Adds the measured CPU flags of this jaxlib to XLA_FLAGS (unless the user's XLA_FLAGS sets
  them already, or CLIP_LORA_JAX_DEFAULT_XLA=1 asks for XLA's own defaults); returns the added."""
  if environ.get("CLIP_LORA_JAX_DEFAULT_XLA") == "1":
    return ()
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  current = environ.get("XLA_FLAGS", "")
  added = tuple(flag for flag in CPU_FLAGS.get(".".join(version.split(".")[:2]), ())
                if flag.split("=")[0] not in current)
  if added:
    environ["XLA_FLAGS"] = " ".join((current, *added)).strip()
  return added


def use_compilation_cache(environ: MutableMapping[str, str] = os.environ) -> str:
  """Turns on JAX's persistent compilation cache, in `$JAX_COMPILATION_CACHE_DIR` if set, else
  under the library's cache directory (`files.default_cache_dir()`); returns the directory.

  A second run of the same command then loads its compiled programs instead of compiling them
  (on a GPU, 1.6 s instead of 31 s for the ViT-B/16 train step: benchmarks/gpu.py). Programs
  are cached however fast they compile (JAX's default skips those under a second): the set-up's
  many small eager programs add up to seconds too. `JAX_ENABLE_COMPILATION_CACHE=false` turns
  the cache off.
  """
  environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                            os.path.join(default_cache_dir(), "jax_compilation"))
