"""The model seam (dfgm_jax/diffusion/denoiser.py): init, load, sampler, mode guard."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import tiny
from dfgm_jax import checkpoint as ckpt_lib
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax import parallel
from dfgm_jax.diffusion import denoiser
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import modes
from dfgm_jax.train import diffusion


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def _batch(n=2, size=32):
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 1.0, (n, size, size, 1)).astype(np.float32)
  h = rng.uniform(-0.8, 0.0, (n, size, size, 1)).astype(np.float32)
  tumor = np.zeros((n, size, size, 1), np.float32)
  tumor[:, 12:20, 12:20] = 1.0
  return x, tumor, h, np.arange(n, dtype=np.int32)


def _config():
  config = tiny.get_config()
  config.sampler.steps = 2
  config.sampler.resamples = 1
  return config


def _perturbed(params, scale=0.05):
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda a: a + scale * rng.normal(size=a.shape).astype(np.float32),
                      params)


def _workdir(path, config, state, steps=(10,)):
  ckpt = ckpt_lib.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  for step in steps:
    ckpt.save(step, state, {"config": config.to_dict()}, force=True)
  ckpt.close()
  return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir whose EMA differs from its params, and the export of its EMA."""
  config = _config()
  _, _, state = diffusion.init_state(config)
  state = {**state, "ema": _perturbed(state["ema"])}
  root = tmp_path_factory.mktemp("denoiser")
  workdir = _workdir(root / "g1", config, state, steps=(10, 20))
  export = model_io.export(state["ema"], config, 20, str(root / "model"))
  return config, state, workdir, export


def test_init_gives_the_trainers_initial_weights():
  config = _config()
  _, _, state = diffusion.init_state(config, rng_seed=3)
  d = denoiser.Denoiser.init(config, seed=3)
  assert _leaves_equal(d.params, state["ema"])
  assert d.step == 0 and d.model_id is None and d.loss_region == "ring"
  assert d.r_out == masks.radius_for_size(6.0, 32) == 1 and d.r_in == 0
  assert d.region == "ring" and d.num_params == sum(
      x.size for x in jax.tree.leaves(state["ema"]))


def test_export_and_workdir_load_the_same_ema_and_sample_the_same(trained):
  config, state, workdir, export = trained
  other = _config()
  other.model.overrides.base_channels = 24  # the model's own sections win.
  from_export = denoiser.Denoiser.load(export, other)
  from_workdir = denoiser.Denoiser.load(workdir, other, mesh=parallel.make_mesh(1))
  assert from_export.step == from_workdir.step == 20
  assert from_export.model_id == model_io.read_record(export)["params_sha256"]
  assert from_workdir.model_id is None
  assert from_workdir.loss_region == "ring" and from_export.loss_region is None
  for d in (from_export, from_workdir):
    assert d.config.model.overrides.to_dict() == config.model.overrides.to_dict()
    assert _leaves_equal(d.params, state["ema"])  # the EMA, not the params.
  # The sampler is modes.synthesize_batch with the model's schedule and radii
  # (what synthesis compiled before the seam).
  x, tumor, h, index = _batch()
  mesh = parallel.make_mesh(1)
  got = from_workdir.sampler("dfgm", 7, mesh)(from_workdir.params, x, tumor, h, index)
  want = jax.jit(lambda p, x, t, h, i: modes.synthesize_batch(
      "dfgm", from_export.eps_fn(p), from_export.schedule, from_export.sampler_config,
      x, t, h, jax.random.key(7), i, 1, 0))(from_export.params, x, tumor, h, index)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The loaded network (built abstractly, no weights computed) is the one
  # init builds: the same graph, so the same computation.
  assert from_export.graphdef == from_workdir.graphdef == denoiser.Denoiser.init(config).graphdef


def test_corrupt_newest_checkpoint_falls_back_mismatch_is_refused(trained, tmp_path):
  config, _, workdir, _ = trained
  workdir = shutil.copytree(workdir, tmp_path / "g1")
  mismatched = shutil.copytree(workdir, tmp_path / "other")

  def truncate(step):
    # Every array data file: the EMA's are among them (a file that holds only
    # the optimizer's arrays would not matter to a sampler, which reads the EMA).
    folder = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
    for name in os.listdir(folder):
      path = os.path.join(folder, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)

  truncate(20)
  assert denoiser.Denoiser.load(str(workdir), config).step == 10
  truncate(10)  # every step corrupt: no readable checkpoint, naming the steps.
  with pytest.raises(model_io.ModelError, match=r"no readable checkpoint \(steps \[20, 10\]"):
    denoiser.Denoiser.load(str(workdir), config)
  # Readable weights of another network than their config describes (as after
  # a change of the model code): refused, not skipped as corrupt.
  meta = os.path.join(mismatched, "checkpoints", "20", "meta", "metadata")
  record = json.loads(open(meta).read())
  record["config"]["model"]["overrides"]["base_channels"] = 24
  with open(meta, "w") as f:
    json.dump(record, f)
  with pytest.raises(model_io.ModelError, match="readable but does not fit") as e:
    denoiser.Denoiser.load(str(mismatched), config)
  assert isinstance(e.value, errors.UserError)


def test_not_a_model_folder(tmp_path):
  with pytest.raises(model_io.ModelError, match="neither an exported model"):
    denoiser.Denoiser.load(str(tmp_path), _config())


def test_mode_must_fit_the_region_the_model_was_trained_with(tmp_path):
  """Issue 11 item 13: a ring model sees no other conditioning mask."""
  config = _config()
  config.mask.r_in_240 = 16.0  # dfgm_inner's band: 2 px at 32.
  ring = denoiser.Denoiser.init(config)
  ring.check_mode("dfgm")
  ring.check_mode("cutpaste")  # no network.
  for mode in ("anomalydiffusion", "dfgm_inner"):
    with pytest.raises(errors.ConfigError, match=f"mode={mode}.*mask.region='ring'.*use mode dfgm"):
      ring.check_mode(mode)
    with pytest.raises(errors.ConfigError):
      ring.sampler(mode, 0)
  # An anomalydiffusion model: conditioned and trained on the dilated region.
  config.mask.region = "dilated"
  dilated = denoiser.Denoiser.init(config)
  with pytest.raises(errors.ConfigError, match="loss_region='ring'"):
    dilated.check_mode("anomalydiffusion")
  config.train.loss_region = "dilated"
  denoiser.Denoiser.init(config).check_mode("anomalydiffusion")
  with pytest.raises(errors.ConfigError, match="mode=dfgm:"):
    denoiser.Denoiser.init(config).check_mode("dfgm")
  # An export records the loss region: the same refusal from the export alone.
  config.train.loss_region = "ring"
  out = model_io.export(dilated.params, config, 0, str(tmp_path / "m"),
                        loss_region=dilated.loss_region)
  exported = denoiser.Denoiser.load(out, _config())
  assert exported.loss_region == "ring"
  with pytest.raises(errors.ConfigError, match="loss_region='ring'"):
    exported.check_mode("anomalydiffusion")
  # Unknown loss region (an export made without it): the conditioning check alone.
  dilated.loss_region = None
  dilated.check_mode("anomalydiffusion")
  # An illustration may show other modes with the same model.
  ring.sampler("anomalydiffusion", 0, check=False)
  with pytest.raises(errors.ConfigError, match="unknown mode"):
    ring.check_mode("magic")


def test_export_of_a_workdir_holds_its_ema_exactly(trained, tmp_path):
  config, state, workdir, _ = trained
  out, step = model_io.export_workdir(workdir, config, str(tmp_path / "model"))
  record, arrays = model_io.read_export(out)
  want = model_io.flatten(state["ema"])
  assert step == record["step"] == 20 and arrays.keys() == want.keys()
  assert all(np.array_equal(arrays[k], want[k]) for k in want)
