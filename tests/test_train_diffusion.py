"""Diffusion training: loss falls, device/process-count invariance, resume,
preemption (dfgm_jax/train/diffusion.py, launch/train_diffusion.py)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import portpicker
import pytest

from tests.conftest import ROOT, train_tiny

WORKER = os.path.join(ROOT, "tests", "train_worker.py")
# Subprocesses compiling the same program share a persistent compilation cache.
_CACHE = os.path.join(tempfile.gettempdir(), f"dfgm_test_jax_cache_{os.getuid()}")


def _env(devices=None):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run_worker(tmp_path, name, devices=None, env_devices=None, **kw):
  out = tmp_path / f"{name}.npz"
  cmd = [sys.executable, WORKER, f"--workdir={tmp_path / name}", f"--out={out}"]
  if devices:
    cmd.append(f"--devices={devices}")
  cmd += [f"--{k}={v}" for k, v in kw.items()]
  r = subprocess.run(cmd, env=_env(env_devices), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return dict(np.load(out))


def _assert_same_params(a, b, atol):
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


@pytest.mark.slow
@pytest.mark.ci_slow
def test_loss_falls_on_phantom_data(preprocessed_2020, tmp_path):
  out, manifest = preprocessed_2020
  _, sampler, result = train_tiny(out, tmp_path, "TCIA", 200, log_every=10,
                                  checkpoint_every=200, warmup_steps=20)
  assert sampler.tumor_image is not None and len(sampler.tumor_image) == \
      manifest["splits"]["TCIA_train"]["num_slices"]
  assert result["step"] == 200 and not result["preempted"]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [l["loss"] for l in lines]
  assert len(losses) == 20 and all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
  assert {"grad_norm", "lr", "images_per_s", "step_time_s"} <= set(lines[-1])
  assert os.listdir(tmp_path / "tensorboard")
  assert "200" in os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
@pytest.mark.ci_slow
def test_one_and_eight_devices_agree(tmp_path):
  one = _run_worker(tmp_path, "one", devices=1, env_devices=8)
  eight = _run_worker(tmp_path, "eight", devices=8, env_devices=8)
  assert int(one["step"]) == int(eight["step"]) == 6
  _assert_same_params(one, eight, atol=2e-5)


@pytest.mark.slow
@pytest.mark.ci_slow
def test_two_processes_match_one(tmp_path):
  port = portpicker.pick_unused_port()
  single = _run_worker(tmp_path, "single")
  procs = []
  for pid in range(2):
    cmd = [sys.executable, WORKER, f"--workdir={tmp_path / 'multi'}",
           f"--out={tmp_path / 'multi.npz'}", "--num_processes=2",
           f"--process_id={pid}", f"--port={port}"]
    procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  multi = dict(np.load(tmp_path / "multi.npz"))
  _assert_same_params(single, multi, atol=2e-5)


def _binary(workdir, *flags):
  return [sys.executable, "-m", "launch.train_diffusion", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--config.train.num_steps=40",
          "--config.train.checkpoint_every=10", "--config.train.log_every=10",
          *flags]


def _wait_for(path, proc, timeout=300):
  start = time.time()
  while not (os.path.exists(path) and os.path.getsize(path)):
    if proc.poll() is not None:
      raise AssertionError(f"exited early: {proc.stderr.read()[-3000:]}")
    if time.time() - start > timeout:
      raise AssertionError(f"{path} never appeared")
    time.sleep(0.05)


def _params_of(workdir):
  """Final parameters read back from the last checkpoint of a run."""
  import jax
  from configs import tiny
  from dfgm_jax import checkpoint as ckpt_lib
  from dfgm_jax.train import diffusion
  _, _, target = diffusion.init_state(tiny.get_config())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step, state, _ = ckpt.restore_latest(target)
  ckpt.close()
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                jax.tree_util.tree_leaves_with_path(state["params"])}


@pytest.mark.slow
@pytest.mark.ci_slow
def test_kill_then_resume_equals_uninterrupted(tmp_path):
  ref = subprocess.run(_binary(tmp_path / "ref"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  victim = subprocess.Popen(_binary(tmp_path / "run"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(tmp_path / "run" / "checkpoints" / "20", victim)
  victim.kill()  # SIGKILL: no chance to clean up.
  victim.wait()
  resumed = subprocess.run(_binary(tmp_path / "run"), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr
  # Steps logged after checkpoint 20 by the killed run are replayed: one row each.
  rows = [json.loads(l)["step"] for l in
          (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows == [10, 20, 30, 40], rows
  step_a, a = _params_of(tmp_path / "ref")
  step_b, b = _params_of(tmp_path / "run")
  assert step_a == step_b == 40
  _assert_same_params(a, b, atol=0)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(_binary(tmp_path, "--config.train.num_steps=100000",
                                  "--config.train.checkpoint_every=100000"),
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(tmp_path / "metrics.jsonl", proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped at step" in err
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(steps) == 1 and steps[0] >= 10
  assert "stopped" in out


def test_binary_refuses_another_run_in_one_line(tmp_path):
  """A different network on a used workdir: one line, exit 1, nothing touched."""
  from configs import tiny
  from dfgm_jax.train import diffusion
  from dfgm_jax.train import loop
  identity = diffusion.run_identity(json.loads(tiny.get_config().to_json_best_effort()))
  loop.claim_workdir(str(tmp_path), identity, identity_fn=diffusion.run_identity,
                     what="a diffusion training run")
  record = (tmp_path / loop.RUN_RECORD).read_text()
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)  # the run saved a step.
  r = subprocess.run(_binary(tmp_path, "--config.model.overrides.base_channels=24"),
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert "model.overrides.base_channels: None -> 24" in r.stderr
  assert "--overwrite" in r.stderr
  assert (tmp_path / loop.RUN_RECORD).read_text() == record
  assert os.listdir(tmp_path / "checkpoints") == ["10"]


def test_a_finished_run_continued_on_other_slices_is_refused(preprocessed_2020, tmp_path):
  """run.json holds what G1 learnt from; other slices are another run."""
  from configs import tiny
  from dfgm_jax import errors
  from dfgm_jax.train import diffusion
  from dfgm_jax.train import loop
  from launch import train_data
  data_dir, manifest = preprocessed_2020
  config = tiny.get_config()
  config.train.reader, config.train.center = "grain", "TCIA"
  sampler = train_data.make_sampler(config, data_dir)
  from dfgm_jax.train import batches
  n = manifest["splits"]["TCIA_train"]["num_slices"]
  keep = batches.select_n_shot(n, config.train.n_shot, config.train.sampler_seed)
  fingerprint = sampler.data_fingerprint
  assert fingerprint["private"].startswith(f"TCIA_train: {len(keep)} of {n} slices, "
                                           "sha256 ")
  healthy = manifest["splits"]["healthy"]
  assert fingerprint["public"] == (f"healthy: {healthy['num_slices']} slices of "
                                   f"{healthy['num_cases']} cases")
  # A run of these slices that saved a step.
  identity = diffusion.run_identity(json.loads(config.to_json_best_effort()))
  loop.claim_workdir(str(tmp_path), {**identity, diffusion.TRAINING_DATA: fingerprint},
                     identity_fn=diffusion.run_identity, what="a diffusion training run")
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  record = (tmp_path / loop.RUN_RECORD).read_text()
  # Continued on other slices (one private pixel differs): refused before training.
  tumor = train_data.load_split(data_dir, "TCIA_train", "grain", shard=False)
  tumor["image"] = tumor["image"].copy()
  tumor["image"][:, 0, 0, 0] += 0.5
  sampler.data_fingerprint = train_data.data_fingerprint(config, data_dir, tumor, keep)
  config.train.num_steps *= 2  # a longer run of the same config would continue.
  with pytest.raises(errors.RunMismatch) as e:
    diffusion.train(config, str(tmp_path), sampler.batch, progress=False)
  assert "training_data.private: 'TCIA_train: " in str(e.value)
  assert (tmp_path / loop.RUN_RECORD).read_text() == record
  assert os.listdir(tmp_path / "checkpoints") == ["10"]
  # A run recorded before the data was (no training_data) is not refused.
  old = tmp_path / "old"
  loop.claim_workdir(str(old), identity, identity_fn=diffusion.run_identity,
                     what="a diffusion training run")
  (old / "checkpoints" / "10").mkdir(parents=True)
  loop.claim_workdir(str(old), {**identity, diffusion.TRAINING_DATA: fingerprint},
                     identity_fn=diffusion.run_identity, what="a diffusion training run",
                     recorded_since=(diffusion.TRAINING_DATA,))
  assert json.loads((old / loop.RUN_RECORD).read_text())["identity"][
      diffusion.TRAINING_DATA] == fingerprint
