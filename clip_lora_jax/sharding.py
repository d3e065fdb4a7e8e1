"""Data-parallel sharding over a device mesh, on one CPU, GPUs or a multi-host TPU pod slice.

One mesh axis, `data`. Images are sharded over it; the LoRA state is replicated; the frozen base
weights are replicated or, with `fsdp`, sharded along their largest divisible axis (XLA gathers
them where they are used); the class prompts of the text side are sharded over the mesh too, so
ImageNet's 1,000 prompts per step are encoded by all devices together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from clip_lora_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
  """Joins a multi-process run; a no-op for a single process.

  On TPU pod slices (and Slurm clusters) `jax.distributed.initialize()` finds its peers
  itself: pass `auto` (or set JAX_DISTRIBUTED=1). Elsewhere pass the coordinator's `host:port`,
  the process count and this process's id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID). On CPU, collectives go through gloo.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  auto = auto or os.environ.get("JAX_DISTRIBUTED") == "1"
  if not (coordinator_address or auto) and (num_processes or 1) == 1:
    return
  if not auto and (num_processes is None or process_id is None):
    raise UserError("a multi-process run needs the coordinator address, the number of "
                    "processes and this process's id (--coordinator_address, --num_processes, "
                    "--process_id, or the JAX_* environment variables)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D `data` mesh over all devices of all processes (or the first `num_devices`)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 0 < n <= len(devices):
    raise UserError(f"asked for {n} devices but {len(devices)} are available")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int = 2**16) -> P:
  """Shards the largest axis divisible by `num_shards` of arrays of at least `min_size`
  elements; small or indivisible arrays stay replicated."""
  if int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      return P(*[DATA_AXIS if a == axis else None for a in range(len(shape))])
  return P()


def params_sharding(params: Any, mesh: Mesh, fsdp: bool = False) -> Any:
  """Shardings for the frozen base weights: replicated, or FSDP-style with `fsdp`."""
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), params)
  n = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n)), params)


def process_rows() -> dict[str, int]:
  """This process's place among the processes, as the data pipelines take it."""
  return dict(process_index=jax.process_index(), process_count=jax.process_count())


def check_divisible(batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  devices = mesh.shape[DATA_AXIS]
  if batch_size % devices:
    raise UserError(f"batch_size={batch_size} does not split over {devices} devices; use a "
                    f"multiple of {devices}")
  if batch_size % jax.process_count():
    raise UserError(f"batch_size={batch_size} does not split over {jax.process_count()} "
                    "processes")


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's rows of the global batch into arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pads the leading axis with copies of the first row up to a multiple of `multiple`."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[:1], extra, axis=0)]) if extra else x


def on_host():
  """A context in which new arrays live on this host's CPU: small eager set-up computations
  (an adapter's initialisation) compile there in milliseconds, where an accelerator compiles
  each small program for a noticeable fraction of a second."""
  return jax.default_device(jax.local_devices(backend="cpu")[0])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Places host arrays identical on every process as replicated global arrays."""
  return jax.device_put(tree, replicated(mesh))


def peak_device_memory_mb() -> float | None:
  """The largest peak of memory in use among this process's accelerators (MiB) since it
  started, as their allocators report it; None where they report none (CPU)."""
  peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use")
           for device in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) / 2**20 if peaks else None
