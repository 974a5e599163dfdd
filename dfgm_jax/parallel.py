"""Mesh, shardings, jax.distributed start-up, host-local -> global batches.

Data parallelism is a `jax.make_mesh` mesh with one `data` axis over every
device of every process: batches are sharded along it, parameters replicated.
No pmap: jitted functions see global arrays and XLA inserts the all-reduce.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"

# Environment variables of launchers that set up a multi-process job; when one
# is present the binaries call jax.distributed.initialize() by default.
_LAUNCHER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                 "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(enabled: bool | None = None,
                                 coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls jax.distributed.initialize() when asked or when a launcher set it up.

  Must run before any other JAX call of the binary.

  Args:
    enabled: True forces, False skips, None detects from the environment.
    coordinator_address, num_processes, process_id: explicit settings (for
      local multi-process runs); None lets JAX read the environment (Cloud TPU,
      SLURM, Open MPI, JAX_COORDINATOR_ADDRESS...).

  Returns:
    Whether jax.distributed was initialised.
  """
  if enabled is None:
    enabled = coordinator_address is not None or any(
        os.environ.get(k) for k in _LAUNCHER_ENV)
  if not enabled:
    return False
  kwargs = {}
  if coordinator_address is not None:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  return True


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1D mesh named `data` over all (or the first num_devices) devices."""
  n = num_devices or jax.device_count()
  devices = jax.devices()[:n]
  return jax.sharding.Mesh(np.asarray(devices), (DATA,))


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch: int) -> int:
  """This process's share of a global batch (must divide evenly)."""
  n = jax.process_count()
  if global_batch % jax.device_count():
    raise ValueError(f"global batch {global_batch} is not a multiple of the "
                     f"{jax.device_count()} devices")
  return global_batch // n


def to_global(batch, mesh):
  """Host-local numpy batch (leading axis = local batch) -> global jax arrays.

  Every process passes its own slice; the result's leading axis is the global
  batch, sharded over `data`. Non-numeric leaves (strings) are dropped.
  """
  sharding = data_sharding(mesh)

  def convert(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x)

  return {k: convert(v) for k, v in batch.items()
          if np.asarray(v).dtype.kind in "biuf"}


def replicate(tree, mesh):
  """Puts a host-identical pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
