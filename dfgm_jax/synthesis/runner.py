"""Staged, multi-host generation of one center's synthesis plan.

The plan (pipeline.plan_pairs) is cut into global batches of
`settings.batch_size` pairs. Every process runs every batch in lock step:
each composes only its own rows, the jitted sampler sees one global batch
sharded over the `data` axis of a mesh spanning all devices of all
processes, and the outputs are gathered to process 0, which stages the batch
as one file. A killed run resumes at the first batch not staged; since each
pair's placement and noise depend only on its plan row, a resumed or
re-sharded run writes the same images.

Only process 0 touches the staging folder, so the workdir need not be shared
between hosts; the other processes learn what is staged by broadcast.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import numpy as np

from dfgm_jax import errors
from dfgm_jax import parallel
from dfgm_jax.diffusion import denoiser
from dfgm_jax.synthesis import pipeline


class NonFiniteOutput(errors.UserError):
  """The network's output holds NaN or infinity (a broken model, not a bug here)."""


class BatchStore:
  """Staged results of one center: plan.npz and one bNNNNNN.npz per batch.

  Every file is written to a temporary name and renamed, so a file that
  exists is complete. directory=None keeps everything in memory (in-process
  synthesis without resume).
  """

  def __init__(self, directory: str | None):
    self.directory = directory
    self._memory = {}

  def _path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def _write(self, name: str, **arrays) -> None:
    if self.directory is None:
      self._memory[name] = {k: np.asarray(v) for k, v in arrays.items()}
      return
    os.makedirs(self.directory, exist_ok=True)
    tmp = self._path(name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, self._path(name))

  def _exists(self, name: str) -> bool:
    if self.directory is None:
      return name in self._memory
    return os.path.exists(self._path(name))

  def _read(self, name: str) -> dict:
    if self.directory is None:
      return self._memory[name]
    with np.load(self._path(name)) as f:
      return {k: f[k] for k in f.files}

  def load_plan(self) -> np.ndarray | None:
    return self._read("plan.npz")["pairs"] if self._exists("plan.npz") else None

  def save_plan(self, pairs: np.ndarray, skipped: int = 0) -> None:
    self._write("plan.npz", pairs=pairs, skipped=np.int64(skipped))

  def skipped(self) -> int:
    """Valid matches the staged plan left out (no placement inside the brain)."""
    plan = self._read("plan.npz")
    return int(plan["skipped"]) if "skipped" in plan else 0

  def batch_name(self, i: int) -> str:
    return f"b{i:06d}.npz"

  def has(self, i: int) -> bool:
    return self._exists(self.batch_name(i))

  def save_batch(self, i: int, image: np.ndarray, mask: np.ndarray, seconds: float) -> None:
    self._write(self.batch_name(i), image=image, mask=mask, seconds=np.float64(seconds))

  def load_batch(self, i: int) -> dict:
    f = self._read(self.batch_name(i))
    return {"image": f["image"], "mask": f["mask"], "seconds": float(f["seconds"])}


def num_batches(num_pairs: int, batch_size: int) -> int:
  return -(-num_pairs // batch_size)


def agreed_plan(store: BatchStore,
                plan_fn: Callable[[], tuple[np.ndarray, int]]) -> np.ndarray:
  """The staged plan, or process 0's fresh one (staged); the same on every process.

  plan_fn returns (pairs, skipped), as pipeline.plan_pairs.
  """
  pairs = None
  if parallel.is_main():
    pairs = store.load_plan()
    if pairs is None:
      pairs, skipped = plan_fn()
      store.save_plan(pairs, skipped)
  n = int(parallel.broadcast(np.int32(len(pairs) if pairs is not None else 0)))
  if n == 0:  # no valid match at all: nothing to broadcast.
    return np.zeros((0, 3), np.int32)
  return parallel.broadcast(pairs if pairs is not None else np.zeros((n, 3), np.int32))


def run(settings: pipeline.SynthesisSettings, bank: pipeline.MemoryBank, tumors: dict,
        pairs: np.ndarray, generate: Callable, params, mesh: jax.sharding.Mesh,
        store: BatchStore, *, progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        stop_after: int | None = None, name: str = "") -> dict:
  """Generates every batch of `pairs` not yet staged in `store`.

  Args:
    settings, bank, tumors: as for pipeline.synthesize.
    pairs: the agreed plan (same on every process).
    generate: the jitted sampler f(params, x, tumor, h, index) sharded over
      `mesh` (Denoiser.sampler, or denoiser.make_sampler for a bare eps_fn).
    params: the denoiser's parameters, replicated over `mesh`.
    mesh: the data-parallel mesh over all devices.
    store: process 0's staging of this center.
    progress: called with the number of pairs of each finished batch.
    should_stop: polled after each batch (preemption, agreed across processes).
    stop_after: stop after generating this many batches (tests, dry runs).
    name: what the error messages call this run (the center).

  Returns:
    {"generated": batches generated now, "reused": batches already staged,
     "seconds": time spent generating now, "stopped": whether it stopped early}.

  Raises:
    NonFiniteOutput: the network gave a NaN or an infinity; nothing of that
      batch is staged.
  """
  b = settings.batch_size
  n_dev, n_proc = mesh.size, jax.process_count()
  if b % n_dev:
    raise ValueError(f"sampler.batch_size={b} must be a multiple of the {n_dev} devices")
  total = num_batches(len(pairs), b)
  if total == 0:
    return {"generated": 0, "reused": 0, "seconds": 0.0, "stopped": False}
  staged = parallel.broadcast(np.array([store.has(i) if parallel.is_main() else False
                               for i in range(total)], np.bool_))
  local = b // n_proc
  lo_row = jax.process_index() * local
  data = parallel.data_sharding(mesh)
  generated, seconds, stopped = 0, 0.0, False
  if progress:
    progress(int(sum(min(b, len(pairs) - i * b) for i in np.flatnonzero(staged))))
  for i in range(total):
    if staged[i]:
      continue
    start = time.perf_counter()
    rows = pipeline.pad_rows(pairs[i * b:(i + 1) * b], b)
    inputs = pipeline.compose_pairs(settings, bank, tumors, rows[lo_row:lo_row + local])
    args = [jax.make_array_from_process_local_data(data, inputs[k])
            for k in ("x", "tumor", "h", "index")]
    out = generate(params, *args)
    image, mask = parallel.gather(out), parallel.gather(args[1])
    n = min(b, len(pairs) - i * b)
    # Every process holds the gathered batch, so all of them stop here alike.
    bad = ~np.isfinite(image[:n]).reshape(n, -1).all(axis=1)
    if bad.any():
      raise NonFiniteOutput(
          f"{name or 'synthesis'}: batch {i} of {total} (plan rows {i * b}.."
          f"{i * b + n - 1}): the model gave non-finite values for "
          f"{int(bad.sum())} of {n} images; nothing of this batch is staged. "
          "The model's weights or the sampler settings are broken (a diverged "
          "training run?)")
    took = time.perf_counter() - start
    if parallel.is_main():
      store.save_batch(i, image[:n], mask[:n].astype(np.uint8), took)
    generated, seconds = generated + 1, seconds + took
    if progress:
      progress(n)
    if (should_stop is not None and should_stop()) or (
        stop_after is not None and generated >= stop_after):
      stopped = i + 1 < total
      break
  return {"generated": generated, "reused": int(staged.sum()), "seconds": seconds,
          "stopped": stopped}


def collect(settings: pipeline.SynthesisSettings, bank: pipeline.MemoryBank,
            tumors: dict, pairs: np.ndarray, store: BatchStore) -> dict:
  """All staged batches of a finished center as pipeline.synthesize's dict."""
  b = settings.batch_size
  batches = [store.load_batch(i) for i in range(num_batches(len(pairs), b))]
  size = tumors["image"].shape[1:]
  return {
      "image": (np.concatenate([x["image"] for x in batches]) if batches
                else np.zeros((0,) + size, np.float32)),
      "mask": (np.concatenate([x["mask"] for x in batches]) if batches
               else np.zeros((0,) + size[:-1] + (1,), np.uint8)),
      "seconds": float(sum(x["seconds"] for x in batches)),
      "skipped_placement": store.skipped() if store.load_plan() is not None else 0,
      **pipeline.provenance(settings, bank, tumors, pairs),
  }


def synthesize(settings: pipeline.SynthesisSettings, bank: pipeline.MemoryBank,
               tumors: dict, eps_fn_factory: Callable | None, params, sched, scfg,
               mesh: jax.sharding.Mesh | None = None,
               progress: Callable[[int], None] | None = None, name: str = "") -> dict:
  """Synthetic pairs for the tumor slices of one center, kept in memory.

  Args:
    settings: mode, matching and placement.
    bank: the memory bank.
    tumors: dict with image (M,S,S,C), mask (M,S,S,1), case_id, center,
      slice_index (length-M sequences).
    eps_fn_factory: params -> eps_fn (the trained denoiser); None for modes
      without diffusion.
    params: the denoiser's parameters (EMA), passed as jit arguments.
    sched, scfg: noise schedule and sampler settings.
    mesh: data-parallel mesh (default: every device).
    progress: called with the number of pairs done after each batch.
    name: what error messages call this run (the center).

  Returns:
    dict of arrays image, mask (pairs) and provenance lists: source (salted
    hash of the source slice or patient, pipeline.PROVENANCES), center,
    slice_index (-1 unless per patient), healthy (salted key of the healthy
    slice), rank (0..k-1).
  """
  mesh = mesh or parallel.make_mesh()
  store = BatchStore(None)
  pairs = agreed_plan(store, lambda: pipeline.plan_pairs(settings, bank, tumors))
  generate = denoiser.make_sampler(settings.mode, eps_fn_factory, sched, scfg,
                                  settings.r_out, settings.r_in, settings.seed, mesh)
  params = jax.device_put(params, parallel.replicated(mesh))
  run(settings, bank, tumors, pairs, generate, params, mesh, store, progress=progress,
      name=name)
  return collect(settings, bank, tumors, pairs, store)
