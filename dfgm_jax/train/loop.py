"""Pieces of a training loop that every trainer shares.

A trainer (diffusion.py today; federated rounds and segmentation next) is
written with these, in this order:

  claim_workdir     a workdir belongs to one run: refuse another run's
                    workdir (errors.RunMismatch), or clear it on --overwrite
  make_checkpointer / restore
                    init state, or the newest readable checkpoint (corrupt
                    steps moved aside, another network refused)
  compile_step      jit with shardings and donation, compiled ahead of time
                    so the compile time is measured and logged
  run_steps         steps [start, end): metrics, checkpoints, preemption,
                    progress bar; returns the state and the last metrics

A step function has the signature step(state, batches) -> (state, metrics),
`batches` holding k stacked steps (leading axis k, then the global batch);
the state is replicated over the mesh, the batch sharded over `data`.
FedAvg rounds call run_steps once per client and round (tau steps, no
checkpointer), the same compiled step each time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable

from absl import logging
from etils import epath
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dfgm_jax import checkpoint as ckpt_lib
from dfgm_jax import errors
from dfgm_jax import parallel
from dfgm_jax import paths
from dfgm_jax import stage_io

# A workdir's record of the run it belongs to (written before the first step).
RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"
# What --overwrite removes: the old run's outputs, nothing else in the folder.
RUN_OUTPUTS = (CHECKPOINTS, "metrics.jsonl", "tensorboard", RUN_RECORD)

# --- Batches -------------------------------------------------------------------


def batch_sharding(mesh) -> NamedSharding:
  """(k, B, ...) stacked batches: the batch axis (1) over `data`."""
  return NamedSharding(mesh, P(None, parallel.DATA))


def stack_batches(batch_fn: Callable[[int], dict], step: int, k: int) -> dict:
  """This process's batches for steps [step, step + k), stacked on axis 0."""
  items = [batch_fn(step + i) for i in range(k)]
  return {name: np.stack([it[name] for it in items]) for name in items[0]}


def global_batches(local: dict, mesh) -> dict:
  """Stacked host-local batches -> global arrays sharded over `data`."""
  return parallel.to_global(local, batch_sharding(mesh))


# --- Run identity ----------------------------------------------------------------


def identity_of(config: dict, sections: tuple[str, ...],
                free: dict[str, tuple[str, ...]]) -> dict:
  """The fields of a config (as a JSON dict) that define a run.

  Args:
    config: the config as JSON (`json.loads(config.to_json_best_effort())`),
      or as stored in a checkpoint's meta.
    sections: top-level keys that define the run (a section or a value).
    free: per section, fields that may change within one run (how long, how
      often to log or save, how to read): a rerun with other values resumes.
  """
  out = {}
  for name in sections:
    if name not in config:
      continue
    value = config[name]
    if isinstance(value, dict):
      value = {k: v for k, v in value.items() if k not in free.get(name, ())}
    out[name] = value
  return stage_io.normalise(out)


def _read_json(path: epath.Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: epath.Path, obj: dict) -> None:
  if paths.is_url(str(path)):
    path.write_text(json.dumps(obj, indent=1) + "\n")  # objects appear whole.
  else:
    stage_io.write_json(str(path), obj)


def _has_checkpoints(workdir: epath.Path) -> bool:
  ckpt_dir = workdir / CHECKPOINTS
  return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def _stored_identity(workdir: epath.Path, identity_fn) -> tuple[dict | None, str]:
  """(identity, where from) of the run already in `workdir`, if any."""
  record = _read_json(workdir / RUN_RECORD)
  if record is not None:
    return record.get("identity"), str(workdir / RUN_RECORD)
  ckpt_dir = workdir / CHECKPOINTS
  if _has_checkpoints(workdir):
    # A workdir from before run records: its checkpoints carry the config.
    ckpt = ckpt_lib.Checkpointer(str(ckpt_dir))
    try:
      step, meta = ckpt.latest_meta()
    finally:
      ckpt.close()
    if meta is not None and "config" in meta:
      return identity_fn(meta["config"]), f"{ckpt_dir}/{step}"
  return None, ""


def claim_workdir(workdir: str, identity: dict, *,
                  identity_fn: Callable[[dict], dict], what: str,
                  overwrite: bool = False,
                  remedy: str = ("Pass --overwrite to delete that run's "
                                 "checkpoints, metrics and TensorBoard events, "
                                 "or use another --workdir."),
                  recorded_since: tuple[str, ...] = ()) -> None:
  """Makes `workdir` this run's: refuses another run's, records this one.

  Compares `identity` with the run record (or, for an older workdir, the
  newest checkpoint's config through `identity_fn`); equal identities resume
  (num_steps and the other free fields may differ). A recorded run that
  saved no checkpoint has nothing to resume or lose (e.g. it ran out of
  memory while compiling), so this run takes its place. With `overwrite`,
  the old run's outputs (RUN_OUTPUTS) are deleted first. Runs on every
  process (all read the same record); process 0 writes. The top-level
  fields of `recorded_since` are compared only when the stored record has
  them (a run recorded before they existed resumes, and is recorded anew).

  Raises:
    errors.RunMismatch: the workdir holds another run, naming what differs.
  """
  wd = epath.Path(workdir)
  if overwrite:
    if parallel.is_main():
      for name in RUN_OUTPUTS:
        p = wd / name
        if p.is_dir():
          if paths.is_url(str(p)):
            p.rmtree()
          else:
            shutil.rmtree(p)
        elif p.exists():
          p.unlink()
      logging.info("--overwrite: removed the previous run's outputs in %s", wd)
    parallel.barrier("dfgm_claim_overwrite")
  else:
    stored, source = _stored_identity(wd, identity_fn)
    compared = {k: v for k, v in identity.items()
                if k not in recorded_since or (stored and k in stored)}
    diffs = (stage_io.differences(stored, stage_io.normalise(compared))
             if stored is not None else [])
    if diffs and _has_checkpoints(wd):
      raise errors.RunMismatch(stage_io.mismatch_message(
          what, source, diffs, remedy))
    if diffs:
      logging.warning("%s: the run recorded there saved no checkpoint; this "
                      "run replaces it (%s)", wd, "; ".join(diffs[:3]))
  record = {"identity": stage_io.normalise(identity)}
  if parallel.is_main() and _read_json(wd / RUN_RECORD) != record:
    wd.mkdir(parents=True, exist_ok=True)
    _write_json(wd / RUN_RECORD, record)
  parallel.barrier("dfgm_claim_workdir")


# --- State: checkpoints and restore ----------------------------------------------


def make_checkpointer(workdir: str, train_config) -> ckpt_lib.Checkpointer:
  """workdir/checkpoints with the config's retention and async settings."""
  return ckpt_lib.Checkpointer(
      os.path.join(workdir, CHECKPOINTS),  # gs:// URLs join the same way.
      max_to_keep=train_config.checkpoints_to_keep,
      async_save=train_config.async_checkpoints)


def restore(checkpointer: ckpt_lib.Checkpointer, state) -> tuple[int, object]:
  """(step, state): the newest readable checkpoint, else (0, `state`).

  `state` is the freshly initialised state, already placed on the mesh: it is
  the restore target (shapes and shardings). Corrupt steps are moved aside so
  that retrained steps are saved again; another network raises RunMismatch.
  """
  step, restored, _ = checkpointer.restore_latest(state, quarantine=True)
  if restored is None:
    return 0, state
  logging.info("resumed from step %d (%s)", step, checkpointer.directory)
  return int(step), restored


# --- The compiled step ---------------------------------------------------------------


def compile_step(step_fn: Callable, state, batches: dict, mesh, *,
                 name: str = "train", steps_per_dispatch: int = 1):
  """(compiled, seconds): step_fn jitted and compiled ahead of time.

  The state is replicated and donated (updated in place), the stacked
  batches sharded over `data`, the outputs (state, metrics) replicated.
  `state` and `batches` are examples of the arguments (their shapes and
  shardings); nothing is run.
  """
  rep = parallel.replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(rep, batch_sharding(mesh)),
                   out_shardings=(rep, rep), donate_argnums=0)
  start = time.perf_counter()
  compiled = jitted.lower(state, batches).compile()
  seconds = time.perf_counter() - start
  logging.info("%s step compiled in %.1fs (%d steps per dispatch)", name,
               seconds, steps_per_dispatch)
  return compiled, seconds


# --- The loop ----------------------------------------------------------------------


def close_all(checkpointer=None, writer=None, watcher=None) -> None:
  """Finishes a run's checkpoint saves, closes its metrics and restores the
  signal handlers; each may be None. Call it in a `finally`."""
  if checkpointer is not None:
    checkpointer.close()
  if writer is not None:
    writer.close()
  if watcher is not None:
    watcher.restore_handlers()


@dataclasses.dataclass
class LoopResult:
  state: object
  step: int
  metrics: dict  # the last logged metrics (floats), {} when none was logged
  preempted: bool


def run_steps(compiled: Callable, state, batch_fn: Callable[[int], dict], mesh, *,
              start: int, end: int, batch_size: int, steps_per_dispatch: int = 1,
              log_every: int = 0, checkpoint_every: int = 0,
              checkpointer: ckpt_lib.Checkpointer | None = None,
              meta: dict | None = None, writer=None, watcher=None,
              progress: bool = False, desc: str = "train",
              first_batches: dict | None = None) -> LoopResult:
  """Runs steps [start, end) of `compiled`, k = steps_per_dispatch at a time.

  Args:
    compiled: step(state, batches) -> (state, metrics), e.g. from compile_step.
    state: the state at `start` (donated to the first call).
    batch_fn: step -> this process's batch for that step (numpy dict).
    mesh: the mesh the batches are sharded over.
    start, end: the step range; both multiples of steps_per_dispatch.
    batch_size: the global batch size (for images_per_s).
    log_every: write metrics every this many steps and at `end` (0: only at
      `end`), through `writer` (a metrics.MetricsWriter) when given.
    checkpoint_every: save every this many steps (0: never on an interval);
      with a checkpointer, the last step (or a preemption) is always saved.
    checkpointer, meta: where to save, and the JSON saved beside the state
      (next_step is added).
    watcher: a checkpoint.PreemptionWatcher; when it fires the loop saves and
      stops early (LoopResult.preempted).
    progress: show a progress bar (process 0).
    first_batches: stacked local batches for `start` when already built (the
      ones the step was compiled with).

  Returns:
    LoopResult: the state and step reached, the last metrics, whether stopped
    by a preemption signal.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  k = steps_per_dispatch
  meta = meta or {}
  bar = tqdm(total=end, initial=start, desc=desc, unit="step",
             disable=not (progress and parallel.is_main()))
  step, local, last, preempted = start, first_batches, {}, False
  window_start, window_steps = time.perf_counter(), 0
  try:
    while step < end:
      if local is None:
        local = stack_batches(batch_fn, step, k)
      with jax.profiler.StepTraceAnnotation(desc, step_num=step):
        state, metrics = compiled(state, global_batches(local, mesh))
      local = None
      step += k
      window_steps += k
      bar.update(k)
      if (log_every and step % log_every == 0) or step == end:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        last = {name: float(v) for name, v in metrics.items()}
        last.update(step_time_s=elapsed / window_steps,
                    images_per_s=window_steps * batch_size / elapsed)
        if writer is not None:
          writer.write(step, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}" if "loss" in last else "")
        window_start, window_steps = time.perf_counter(), 0
      if checkpointer is not None and checkpoint_every and step % checkpoint_every == 0:
        checkpointer.save(step, state, {**meta, "next_step": step}, force=True)
      if watcher is not None and watcher.requested():
        preempted = True
        break
    if checkpointer is not None and (preempted or step == end):
      checkpointer.save(step, state, {**meta, "next_step": step}, force=True)
  finally:
    bar.close()
  return LoopResult(state=state, step=step, metrics=last, preempted=preempted)
