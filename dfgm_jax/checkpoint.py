"""orbax CheckpointManager behind three calls: save, restore_latest, close.

A checkpoint holds two items: `state` (a pytree of arrays: parameters, EMA,
optimizer state, step, RNG key data) and `meta` (JSON: config, data position,
anything a resume needs). Saves are async; orbax writes into a temporary
folder and renames it when complete, so a half-written step is never listed.
A latest step that is listed but unreadable (disk corruption, a killed copy)
falls back to the previous step with a warning.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dfgm_jax import parallel
from dfgm_jax import paths


class Checkpointer:
  """Saves and restores training state under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    self.directory = paths.absolute(directory)  # gs:// URLs stay URLs.
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, create=True))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves when `step` is on the save interval (or `force`); async."""
    if step in self._manager.all_steps():
      return False  # already saved (e.g. a forced final save on an interval).
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, target):
    """Restores `step` into the structure/shardings of `target`.

    Args:
      step: the step to read.
      target: pytree of jax.ShapeDtypeStruct (with shardings) or arrays.

    Returns:
      (state, meta).
    """
    abstract = jax.tree.map(_abstract, target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, target):
    """The newest readable checkpoint, falling back past unreadable ones.

    Returns:
      (step, state, meta), or (None, None, None) when there is none.
    """
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, target)
      except Exception as e:  # orbax/tensorstore raise many types.
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                        "falling back to the previous one", step,
                        self.directory, type(e).__name__, str(e)[:300])
        continue
      return step, state, meta
    return None, None, None

  def latest_meta(self) -> tuple[int | None, dict | None]:
    """(step, meta) of the newest checkpoint whose meta is readable."""
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types.
        logging.warning("checkpoint step %d meta unreadable (%s)", step, e)
        continue
      return step, restored["meta"]
    return None, None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _abstract(x):
  """ShapeDtypeStruct with a concrete sharding (see ECOSYSTEM.md 4, pitfall 1)."""
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                              sharding=getattr(x, "sharding", None))


class PreemptionWatcher:
  """Turns SIGTERM (cloud preemption) into a flag the training loop polls.

  The loop saves a checkpoint and exits cleanly when `requested` is set;
  with several processes the flag is agreed on (any process) so that all
  save the same step.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: checkpointing and exiting", signum)
    self._event.set()

  def requested(self) -> bool:
    return parallel.any_process(self._event.is_set())

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
