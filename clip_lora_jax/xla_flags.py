"""XLA runtime settings that the command lines apply before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first computation creates a backend, and aborts on a flag
it does not know; so flags are tied to the jaxlib versions they were measured with.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

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
