"""Checkpoint integrity and run identity of a training workdir (dfgm_jax/train/loop.py,
dfgm_jax/checkpoint.py, dfgm_jax/train/metrics.py; issue 11 items 1-3).

One tiny run is trained once per module (a compile costs tens of seconds on
a shared CPU); each test works on a copy of its workdir. Refusals happen
before any compile, so they cost nothing.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfgm_jax import checkpoint as ckpt_lib
from dfgm_jax import errors
from dfgm_jax.train import diffusion
from dfgm_jax.train import loop
from dfgm_jax.train import metrics as metrics_lib
from tests import test_paths

STEPS = 4
fake_bucket = test_paths.fake_bucket  # gs://bucket served from tmp_path.


def _config(**train):
  from configs import tiny
  config = tiny.get_config()
  config.train.num_steps = STEPS
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  for key, value in train.items():
    setattr(config.train, key, value)
  return config


def _train(config, workdir, **kw):
  from launch import train_data
  sampler = train_data.make_sampler(config, None)  # reader=synthetic
  return diffusion.train(config, str(workdir), sampler.batch, progress=False, **kw)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, final params as numpy) of a 4-step run, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = _train(_config(), workdir)
  assert result["step"] == STEPS
  return workdir, _flat(result["state"]["params"])


def _copy(trained, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(trained[0], dst)
  return dst


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def _rows(workdir):
  return [json.loads(l)["step"] for l in
          (workdir / "metrics.jsonl").read_text().splitlines()]


def _truncate_largest_file(folder):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_corrupt_newest_checkpoint_is_retrained_and_saved(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  assert _steps(workdir) == [2, 4] and _rows(workdir) == [1, 2, 3, 4]
  _truncate_largest_file(workdir / "checkpoints" / str(STEPS))
  # Training longer (num_steps is free to change) resumes the same run.
  result = _train(_config(num_steps=STEPS + 2), workdir)
  assert result["step"] == STEPS + 2
  # The unreadable step was moved aside, and its retrained replacement saved.
  assert f"{STEPS}.corrupt-1" in os.listdir(workdir / "checkpoints")
  assert _steps(workdir) == [2, 4, 6]
  _, _, target = diffusion.init_state(_config())
  ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  try:
    assert ckpt.restore_latest(target)[0] == STEPS + 2
    state, meta = ckpt.restore(STEPS, target)  # reads: not the corrupt copy.
  finally:
    ckpt.close()
  assert meta["next_step"] == STEPS
  # The model a later export or synthesis reads is the new final step.
  from dfgm_jax.diffusion import denoiser
  assert denoiser.Denoiser.load(str(workdir), _config()).step == STEPS + 2
  # Replayed from step 2 exactly: the same weights as the first run's step 4.
  again = _flat(state["params"])
  assert set(again) == set(trained[1])
  for name, value in trained[1].items():
    np.testing.assert_array_equal(again[name], value, err_msg=name)
  # Steps 3 and 4 were logged again after the fallback: still one row each.
  assert _rows(workdir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("section,field,value", [
    ("model.overrides", "base_channels", 24),
    ("data", "image_size", 48),
    ("mask", "region", "dilated"),
    ("train", "loss_region", "full"),
    ("train", "reader", "grain"),
])
def test_another_run_in_the_workdir_is_refused(trained, tmp_path, section, field,
                                               value):
  workdir = _copy(trained, tmp_path)
  before = sorted(os.listdir(workdir / "checkpoints"))
  metrics_before = (workdir / "metrics.jsonl").read_text()
  config = _config(num_steps=8)
  node = config
  for part in section.split("."):
    node = node[part]
  node[field] = value
  with pytest.raises(errors.RunMismatch) as e:
    diffusion.train(config, str(workdir), lambda step: None, progress=False)
  message = str(e.value)
  assert f"{section}.{field}:" in message and "--overwrite" in message, message
  assert "num_steps" not in message  # free to change within one run.
  assert sorted(os.listdir(workdir / "checkpoints")) == before
  assert (workdir / "metrics.jsonl").read_text() == metrics_before


def test_workdir_without_run_record_is_checked_against_its_checkpoints(
    trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  os.remove(workdir / loop.RUN_RECORD)  # as written before run records existed.
  config = _config()
  config.model.overrides.base_channels = 24
  with pytest.raises(errors.RunMismatch, match="base_channels: None -> 24"):
    diffusion.train(config, str(workdir), lambda step: None, progress=False)
  assert _steps(workdir) == [2, 4]


def test_overwrite_clears_the_old_run_only(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "2").mkdir(parents=True)
  (workdir / "tensorboard").mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  (workdir / "notes.txt").write_text("mine")
  old = diffusion.run_identity(json.loads(_config().to_json_best_effort()))
  loop.claim_workdir(str(workdir), old, identity_fn=diffusion.run_identity,
                     what="a run")
  config = _config()
  config.model.overrides.base_channels = 24
  new = diffusion.run_identity(json.loads(config.to_json_best_effort()))
  with pytest.raises(errors.RunMismatch):
    loop.claim_workdir(str(workdir), new, identity_fn=diffusion.run_identity,
                       what="a run")
  loop.claim_workdir(str(workdir), new, identity_fn=diffusion.run_identity,
                     what="a run", overwrite=True)
  assert sorted(os.listdir(workdir)) == ["notes.txt", loop.RUN_RECORD]
  record = json.loads((workdir / loop.RUN_RECORD).read_text())
  assert record["identity"]["model"]["overrides"]["base_channels"] == 24
  # The same identity again (another num_steps) is this run: accepted.
  config.train.num_steps = 99
  loop.claim_workdir(str(workdir), diffusion.run_identity(
      json.loads(config.to_json_best_effort())),
                     identity_fn=diffusion.run_identity, what="a run")
  # A recorded run without any checkpoint (e.g. out of memory while
  # compiling) has nothing to lose: another config takes its place.
  loop.claim_workdir(str(workdir), old, identity_fn=diffusion.run_identity,
                     what="a run")
  record = json.loads((workdir / loop.RUN_RECORD).read_text())
  assert record["identity"]["model"]["overrides"]["base_channels"] is None


def test_bad_training_settings_are_refused_before_any_io(tmp_path):
  workdir = tmp_path / "run"
  for config, match in ((_config(steps_per_dispatch=3), "steps_per_dispatch"),
                        (_config(batch_size=0), "config.train.batch_size=0")):
    with pytest.raises(errors.ConfigError, match=match):
      diffusion.train(config, str(workdir), lambda step: None, progress=False)
  assert not workdir.exists()


def test_checkpoint_of_another_shape_is_a_mismatch_not_corruption(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.arange(4.0) * step}, {"next_step": step})
  ckpt.wait()
  with pytest.raises(errors.RunMismatch, match="not corrupt"):
    ckpt.restore_latest({"w": jnp.zeros(5)})
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_corrupt_step_is_moved_aside_only_when_asked(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  target = {"w": jnp.zeros(4)}
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.arange(4.0) * step}, {"next_step": step})
  ckpt.close()
  _truncate_largest_file(tmp_path / "2" / "state")
  reader = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  assert reader.restore_latest(target)[0] == 1
  reader.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # readers change nothing.
  trainer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  assert trainer.restore_latest(target, quarantine=True)[0] == 1
  assert trainer.all_steps() == [1]
  assert trainer.save(2, {"w": jnp.full(4, 7.0)}, {"next_step": 2})
  trainer.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.corrupt-1"]
  again = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  step, state, _ = again.restore_latest(target)
  again.close()
  assert step == 2
  np.testing.assert_array_equal(state["w"], np.full(4, 7.0))


def test_metrics_resume_keeps_one_row_per_step(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": float(step)})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # killed mid-write.
  # Killed after step 4 was logged, resumed from the checkpoint of step 2.
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False,
                                     resume_step=2)
  for step in (3, 4):
    writer.write(step, {"loss": 10.0 * step})
  writer.close()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert [r["loss"] for r in rows] == [1.0, 2.0, 30.0, 40.0]


def test_run_steps_drives_any_step_function(tmp_path):
  """The loop's pieces with a toy step, as FedAvg rounds will use them."""
  from dfgm_jax import parallel
  mesh = parallel.make_mesh(1)

  def step_fn(state, batches):
    def one(s, b):
      return {"w": s["w"] + jnp.sum(b["x"])}, {"loss": jnp.sum(b["x"])}
    state, metrics = jax.lax.scan(one, state, batches)
    return state, jax.tree.map(jnp.mean, metrics)

  def batch_fn(step):
    return {"x": np.full((2,), step, np.float32)}

  state = jax.device_put({"w": jnp.zeros(())}, parallel.replicated(mesh))
  first = loop.stack_batches(batch_fn, 0, 2)
  compiled, seconds = loop.compile_step(step_fn, state, loop.global_batches(first, mesh),
                                        mesh, steps_per_dispatch=2)
  assert seconds >= 0

  class StopAtSecondCheck:  # a preemption signal after the second dispatch.
    calls = 0

    def requested(self):
      self.calls += 1
      return self.calls == 2

  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  result = loop.run_steps(compiled, state, batch_fn, mesh, start=0, end=8,
                          batch_size=2, steps_per_dispatch=2, log_every=2,
                          checkpoint_every=100, checkpointer=ckpt, meta={"round": 1},
                          writer=writer, watcher=StopAtSecondCheck(),
                          first_batches=first)
  writer.close()
  assert result.preempted and result.step == 4
  assert float(result.state["w"]) == 2 * (0 + 1 + 2 + 3)
  assert ckpt.all_steps() == [4]  # saved on the preemption, not on an interval.
  _, meta = ckpt.restore(4, {"w": jnp.zeros(())})
  ckpt.close()
  assert meta == {"round": 1, "next_step": 4}
  assert _rows(tmp_path) == [2, 4]
  # Another round from where this one stopped, without checkpoints or metrics.
  again = loop.run_steps(compiled, result.state, batch_fn, mesh, start=4, end=8,
                         batch_size=2, steps_per_dispatch=2)
  assert not again.preempted and again.step == 8
  assert float(again.state["w"]) == 2 * sum(range(8))
  assert again.metrics["loss"] == 2 * (6 + 7) / 2  # mean of the last dispatch.


def test_run_record_and_metrics_resume_in_a_bucket_workdir(fake_bucket):
  identity = {"model": {"preset": "tiny"}}
  loop.claim_workdir("gs://bucket/run", identity, identity_fn=lambda c: c,
                     what="a run")
  stored = json.loads((fake_bucket / "bucket/run" / loop.RUN_RECORD).read_text())
  assert stored == {"identity": identity}
  (fake_bucket / "bucket/run/checkpoints/2").mkdir(parents=True)
  with pytest.raises(errors.RunMismatch, match="model.preset: 'tiny' -> 'small'"):
    loop.claim_workdir("gs://bucket/run", {"model": {"preset": "small"}},
                       identity_fn=lambda c: c, what="a run")
  (fake_bucket / "bucket/run/metrics.jsonl").write_text(
      "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
  writer = metrics_lib.MetricsWriter("gs://bucket/run", tensorboard=False,
                                     resume_step=2)
  writer.write(3, {"loss": 1.0})
  writer.close()
  assert _rows(fake_bucket / "bucket/run") == [1, 2, 3]
  assert not os.path.exists("gs:")  # nothing written through local os calls.
