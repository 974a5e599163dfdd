"""A full disk ends in one line, `error: <folder>: No space left on device`, state safe.

The errors are simulated (monkeypatched writers raising what each library
raises on a full disk; the texts are those orbax, tfds and Python gave on a
full tmpfs), not made by filling a disk.
"""

import errno
import os
import subprocess
import sys

import pytest

from dfgm_jax import disk_full
from dfgm_jax import stage_io
from launch import common
from tests.conftest import ROOT

NO_SPACE = "No space left on device"


def _orbax_error(folder):
  """tensorstore's error through orbax, for an async save into `folder`."""
  tmp = f"{folder}/10.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp"
  return ValueError(
      f'RESOURCE_EXHAUSTED: Error writing local file "{tmp}/_sharding": Failed '
      f'writing: "{tmp}/_sharding.__lock": Failed to write 139577 bytes to file 7: '
      f"{NO_SPACE} [os_error_code='28']")


def _tfds_errors(folder):
  """tfds's RuntimeError for each format, writing a set under `folder`."""
  tfrecord = f"{folder}/.build/tfrecord/x/incomplete.ECFE7E_1.0.0/x-train.tfrecord-00000-of-00001"
  try:  # tfds raises it from TF's ResourceExhaustedError.
    try:
      raise OSError(f"{tfrecord}; {NO_SPACE}")
    except OSError as e:
      raise RuntimeError(
          f'ResourceExhaustedError: Failed to finalize writing of split "train": '
          f"{tfrecord}; {NO_SPACE}") from e
  except RuntimeError as e:
    from_tf = e
  array_record = RuntimeError(
      f'Failed to finalize writing of split "train": write() failed: {NO_SPACE}; '
      f"writing {folder}/.build/array_record/x/incomplete.4JZSNV_1.0.0/"
      "x-train.array_record-00000-of-00001; at byte 307200; Failed to close chunk_writer")
  return from_tf, array_record


def test_each_librarys_full_disk_names_the_folder_the_user_chose(tmp_path):
  folder = str(tmp_path / "run")
  cases = [_orbax_error(f"{folder}/checkpoints"), *_tfds_errors(f"{folder}/synthetic"),
           OSError(errno.ENOSPC, NO_SPACE, f"{folder}/g1/metrics.jsonl")]
  wanted = [f"{folder}/checkpoints", f"{folder}/synthetic", f"{folder}/synthetic",
            f"{folder}/g1/metrics.jsonl"]
  for exc, where in zip(cases, wanted):
    assert common.user_error_message(exc) == f"{where}: {NO_SPACE}"
  # A full disk with no path still is the user's; an accelerator's
  # RESOURCE_EXHAUSTED (out of memory) is not a full disk.
  assert common.user_error_message(OSError(errno.ENOSPC, NO_SPACE)) == NO_SPACE
  assert disk_full.path_of(ValueError("RESOURCE_EXHAUSTED: Out of memory")) is None
  assert common.user_error_message(ValueError("RESOURCE_EXHAUSTED: Out of memory")) is None


def test_a_failed_write_names_its_file_and_leaves_nothing(tmp_path, monkeypatch):
  path = str(tmp_path / "record.json")

  class _Full:
    def __init__(self, f):
      self._f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

    def write(self, data):
      del data
      raise OSError(errno.ENOSPC, NO_SPACE)  # what a failing write raises.

  real_open = open
  monkeypatch.setattr("builtins.open", lambda p, *a, **k: _Full(real_open(p, *a, **k)))
  with pytest.raises(OSError) as e:
    stage_io.write_json(path, {"x": 1})
  monkeypatch.undo()
  assert common.user_error_message(e.value) == f"{path}: {NO_SPACE}"
  assert os.listdir(tmp_path) == []  # no temporary file left behind.


def test_a_full_disk_while_writing_a_set_keeps_the_previous_set(tmp_path, monkeypatch):
  from data_pipeline import builder
  from data_pipeline import slice_sets
  out_dir = str(tmp_path / "synthetic")
  previous = os.path.join(out_dir, "array_record")
  os.makedirs(previous)
  with open(os.path.join(previous, "kept"), "w") as f:
    f.write("the previous set")

  def full_build(build_dir, file_format, *args, **kwargs):
    del args, kwargs
    os.makedirs(os.path.join(build_dir, file_format, "x", "incomplete.ECFE7E_1.0.0"))
    raise _tfds_errors(out_dir)[1]

  monkeypatch.setattr(builder, "build_generic", full_build)
  with pytest.raises(disk_full.DiskFull) as e:
    slice_sets.write_set(out_dir, "x", None, {}, ("array_record",))
  assert str(e.value) == f"{out_dir}: {NO_SPACE}"
  assert sorted(os.listdir(out_dir)) == ["array_record"]  # the partial build is gone,
  assert os.listdir(previous) == ["kept"]  # the previous copy untouched.


_TRAIN_WITH_A_FULL_DISK = """
import sys
from absl import app
from absl import logging
import orbax.checkpoint as ocp
from launch import train_diffusion

def full(self, step, *args, **kwargs):
  error = ValueError({error!r})
  if step >= 2:
    try:  # orbax logs each failed background thread with its traceback.
      raise error
    except ValueError:
      logging.exception("_SignalingThread.run() raised an exception")
    raise error
  return real(self, step, *args, **kwargs)

real = ocp.CheckpointManager.save
ocp.CheckpointManager.save = full
app.run(train_diffusion.main)
"""


@pytest.mark.slow  # trains the tiny G1 in a subprocess (a compile).
@pytest.mark.ci_slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path):
  workdir = str(tmp_path / "g1")
  script = tmp_path / "train_full.py"
  script.write_text(_TRAIN_WITH_A_FULL_DISK.format(
      error=str(_orbax_error(os.path.join(workdir, "checkpoints")))))
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run(
      [sys.executable, str(script), "--config=configs/tiny.py", f"--workdir={workdir}",
       "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
       "--config.train.warmup_steps=1", "--config.train.log_every=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error")]
  assert errors == [f"error: {workdir}/checkpoints: {NO_SPACE}"], r.stderr[-3000:]
  assert r.stderr.rstrip().endswith(errors[0])  # the last line.
  # State safe: no step that failed is listed as a checkpoint.
  listed = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert "2" not in listed and "4" not in listed, listed
