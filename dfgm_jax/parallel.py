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


def to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy arrays -> global jax arrays laid out by `sharding`.

  Every process passes its own rows of the sharded axis; the global array
  holds all processes' rows.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


# --- Multi-host coordination (identity operations with one process) ----------


def is_main() -> bool:
  """Process 0: the one that plans, writes files and prints."""
  return jax.process_index() == 0


def broadcast(x) -> np.ndarray:
  """Process 0's array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def gather(x: jax.Array) -> np.ndarray:
  """A global (possibly multi-host) array as one host array, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (e.g. a preemption)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array([flag], np.int32))
  return bool(np.any(flags))
