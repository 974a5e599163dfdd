"""orbax CheckpointManager behind three calls: save, restore_latest, close.

A checkpoint holds two items: `state` (a pytree of arrays: parameters, EMA,
optimizer state, step, RNG key data) and `meta` (JSON: config, data position,
anything a resume needs). Saves are async; orbax writes into a temporary
folder and renames it when complete, so a half-written step is never listed.

Two ways a listed step can fail to restore, told apart because they need
opposite answers:
- corrupt (a truncated or altered file): fall back to the previous step with
  a warning; a trainer also moves the unreadable step aside
  (`<step>.corrupt-<n>`, `quarantine=True`), or its retrained steps could
  never be saved under the same number;
- another network (the stored arrays' shapes differ from the target's):
  errors.RunMismatch, never a fallback; every step would fail the same way
  and a trainer would start over on top of another run.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dfgm_jax import disk_full
from dfgm_jax import errors
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
    with self._disk_full_named():
      return self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          force=force)

  @contextlib.contextmanager
  def _disk_full_named(self):
    """A full disk as DiskFull naming this folder, whichever call meets it.

    An async save fails in orbax's threads and surfaces in the next save,
    wait or close as tensorstore's RESOURCE_EXHAUSTED ValueError. The failed
    step stays in orbax's temporary folder, never listed, so the previous
    checkpoints are what a resume sees.
    """
    try:
      yield
    except Exception as e:  # orbax/tensorstore raise many types.
      full = disk_full.as_disk_full(e, self.directory)
      if full is None:
        raise
      raise full from e

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

  def restore_latest(self, target, *, quarantine: bool = False):
    """The newest readable checkpoint, falling back past corrupt ones.

    Args:
      target: pytree of jax.ShapeDtypeStruct (with shardings) or arrays.
      quarantine: move each corrupt step newer than the one restored aside
        (`<step>.corrupt-<n>`, process 0), so that the steps retrained after
        the fallback can be saved and are the ones a later restore sees. For
        trainers; readers (export, synthesis) leave the folder as it is.

    Returns:
      (step, state, meta), or (None, None, None) when there is none.

    Raises:
      errors.RunMismatch: a step holds arrays of other shapes than `target`
        (another network, not corruption).
    """
    corrupt = []
    found = (None, None, None)
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, target)
      except Exception as e:  # orbax/tensorstore raise many types.
        mismatch = self.shape_mismatch(step, target)
        if mismatch:
          raise errors.RunMismatch(
              f"checkpoint step {step} in {self.directory} holds another "
              f"network ({mismatch}); it is not corrupt. Train it with the "
              "config it was made with, or start a new run in another "
              "workdir (or with --overwrite).") from e
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                        "falling back to the previous one", step,
                        self.directory, type(e).__name__, str(e)[:300])
        corrupt.append(step)
        continue
      found = (step, state, meta)
      break
    if quarantine and corrupt:
      self._quarantine(corrupt)
    return found

  def shape_mismatch(self, step: int, target) -> str | None:
    """How `step`'s stored arrays differ from `target`'s; None when they fit.

    Compares the multiset of array shapes from orbax's metadata, which needs
    no data file, so a corrupt data file reads as "fits" (corruption) and a
    corrupt metadata file as None too (nothing to compare).
    """
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return None
    tree = getattr(metadata, "tree", metadata)
    stored = sorted(tuple(x.shape) for x in jax.tree.leaves(
        tree, is_leaf=lambda x: hasattr(x, "shape")) if hasattr(x, "shape"))
    wanted = sorted(tuple(np.shape(x)) for x in jax.tree.leaves(target))
    if stored == wanted:
      return None
    sizes = [sum(int(np.prod(s)) for s in shapes) for shapes in (stored, wanted)]
    only_stored = sorted(set(stored) - set(wanted))[:3]
    only_wanted = sorted(set(wanted) - set(stored))[:3]
    return (f"{len(stored)} arrays with {sizes[0]} values stored, the network "
            f"has {len(wanted)} with {sizes[1]}; shapes only stored "
            f"{only_stored}, only in the network {only_wanted}")

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable steps aside and forgets them."""
    self.wait()
    if parallel.is_main():
      for step in steps:
        src = epath.Path(self.directory) / str(step)
        n = 1
        while (dst := epath.Path(self.directory) / f"{step}.corrupt-{n}").exists():
          n += 1
        src.rename(dst)
        logging.warning("moved the unreadable checkpoint step %d aside to %s; "
                        "its steps are retrained and saved again", step, dst)
    parallel.barrier("dfgm_checkpoint_quarantine")
    self._manager.reload()

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
    with self._disk_full_named():
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._disk_full_named():
      try:
        self._manager.wait_until_finished()
      finally:
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
