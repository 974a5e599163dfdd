"""Blended sampler invariants (ALGORITHM.md 5 and Appendix B)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfgm_jax.diffusion import sampler
from dfgm_jax.diffusion import schedule as schedule_lib
from tests.conftest import ROOT


@pytest.mark.parametrize("s,jl,r,transitions,nfe", [(250, 10, 10, 4570, 2410),
                                                     (100, 5, 2, 290, 195),
                                                     (100, 5, 1, 100, 100)])
def test_jump_schedule_counts(s, jl, r, transitions, nfe):
  seq = sampler.jump_schedule(s, jl, r)
  assert len(seq) - 1 == transitions
  assert sum(b < a for a, b in zip(seq, seq[1:])) == nfe
  assert seq[0] == s - 1 and seq[-1] == -1
  assert all(abs(b - a) == 1 for a, b in zip(seq, seq[1:]))
  plan = sampler.make_plan(sampler.SamplerConfig(steps=s, jump_length=jl,
                                                 resamples=r), 1000)
  assert plan.nfe == nfe and plan.num_transitions == transitions


def test_ddpm_plan_visits_every_step_once():
  plan = sampler.make_plan(sampler.SamplerConfig(kind="ddpm_blend"), 1000)
  assert plan.nfe == 1000 and plan.num_transitions == 1000
  np.testing.assert_array_equal(plan.grid, np.arange(1000))


def _zero_eps(x, t, c, ring, tumor):
  del t, c, ring, tumor
  return jnp.zeros_like(x)


def _inputs(b=256, s=4):
  y = jnp.full((b, s, s, 1), 0.5)
  ring = jnp.zeros((b, s, s, 1)).at[:, :, : s // 2].set(1.0)
  return y, ring, jnp.zeros_like(ring)


@pytest.mark.parametrize("kind,jl,r", [("ddim_blend", 2, 3), ("ddim_blend", 1, 1),
                                       ("ddpm_blend", 1, 1)])
def test_known_region_follows_q_y_at_the_output_level(kind, jl, r):
  """At every transition (denoise or undo) the known region ~ q(y_to | y)."""
  sched = schedule_lib.make_schedule("linear", 50)
  cfg = sampler.SamplerConfig(kind=kind, steps=12, jump_length=jl, resamples=r)
  y, ring, tumor = _inputs()
  b = y.shape[0]
  x, traj = jax.jit(lambda y, ring, tumor: sampler.blend_sample(
      _zero_eps, sched, cfg, y, ring, tumor, jax.random.key(0),
      jnp.arange(b), return_trajectory=True))(y, ring, tumor)
  plan = sampler.make_plan(cfg, sched.num_steps)
  abar = np.concatenate([[1.0], np.asarray(sched.alphas_cumprod)[plan.grid]])
  known = np.asarray(traj)[:, :, :, 2:, :].reshape(len(plan.to), -1)
  n = known.shape[1]
  for k, to in enumerate(plan.to):
    a = abar[to + 1]
    mean, var = known[k].mean(), known[k].var()
    assert abs(mean - np.sqrt(a) * 0.5) < 5 * np.sqrt((1 - a) / n) + 1e-6, (k, to)
    if a < 1:
      assert abs(var / (1 - a) - 1) < 0.12, (k, to, var, 1 - a)
    else:
      assert var < 1e-10
  # The last transition lands on level -1: the known region is y exactly.
  np.testing.assert_array_equal(known[-1], 0.5)


@pytest.mark.parametrize("kind", sampler.KINDS)
def test_exact_paste_outside_the_ring(kind):
  sched = schedule_lib.make_schedule("linear", 40)
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
  ring = jnp.asarray(rng.uniform(size=(4, 8, 8, 1)) < 0.3, jnp.float32)

  def noisy_eps(x, t, c, r, m):  # an arbitrary network output.
    return jnp.sin(3 * x) + 0.01 * t[:, None, None, None]

  for cfg in (sampler.SamplerConfig(kind=kind, steps=10, jump_length=3, resamples=2),
              sampler.SamplerConfig(kind=kind, steps=10, start_strength=0.5),
              sampler.SamplerConfig(kind=kind, steps=10, adaptive_dilation=True)):
    out = jax.jit(lambda y, r: sampler.blend_sample(
        noisy_eps, sched, cfg, y, r, 0 * r, jax.random.key(1), jnp.arange(4)))(y, ring)
    out = np.asarray(out)
    outside = np.asarray(ring) == 0
    np.testing.assert_array_equal(out[outside], np.asarray(y)[outside])
    assert np.all(np.abs(out) <= 1) and not np.array_equal(out, np.asarray(y))


def test_undo_step_statistics():
  """One undo from level i-1 to i of q(y | i-1) samples gives q(y | i)."""
  sched = schedule_lib.make_schedule("linear", 50)
  cfg = sampler.SamplerConfig(steps=10, jump_length=1, resamples=2)
  plan = sampler.make_plan(cfg, 50)
  undo = [k for k in range(plan.num_transitions) if plan.to[k] > plan.frm[k]]
  assert undo  # the schedule has undo steps.
  y, ring, tumor = _inputs(b=512)
  ring = jnp.zeros_like(ring)  # everything known: pure q(y | level) samples.
  _, traj = sampler.blend_sample(_zero_eps, sched, cfg, y, ring, tumor,
                                 jax.random.key(3), jnp.arange(512),
                                 return_trajectory=True)
  abar = np.concatenate([[1.0], np.asarray(sched.alphas_cumprod)[plan.grid]])
  for k in undo:
    vals = np.asarray(traj[k]).ravel()
    a = abar[plan.to[k] + 1]
    assert abs(vals.mean() - np.sqrt(a) * 0.5) < 0.03
    assert abs(vals.var() / (1 - a) - 1) < 0.08


def test_examples_do_not_depend_on_batch_or_device_count(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sampler_worker.py"),
                      f"--out_dir={tmp_path}"],
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  outs = {(d, b): np.load(tmp_path / f"{d}_{b}.npy")
          for d, b in ((1, 8), (8, 8), (1, 4), (4, 4))}
  ref = outs[(1, 8)]
  assert np.std(ref) > 0.1
  for k, v in outs.items():
    np.testing.assert_allclose(v, ref, atol=1e-5, err_msg=str(k))


@pytest.mark.parametrize("final_paste", [True, False])
def test_nan_from_the_network_does_not_leave_the_ring(final_paste):
  """The blend and the paste are selects: outside the ring x is y exactly,
  also at every step without the final paste (issue 11 item 16)."""
  sched = schedule_lib.make_schedule("linear", 20)
  cfg = sampler.SamplerConfig(steps=4, jump_length=2, resamples=2, final_paste=final_paste)
  y, ring, tumor = _inputs(b=2)
  nan_eps = lambda x, t, c, r, m: jnp.full_like(x, jnp.nan)
  out = np.asarray(jax.jit(lambda y, r, m: sampler.blend_sample(
      nan_eps, sched, cfg, y, r, m, jax.random.key(0), jnp.arange(2)))(y, ring, tumor))
  outside = np.asarray(ring) == 0
  np.testing.assert_array_equal(out[outside], np.asarray(y)[outside])
  assert np.isnan(out[~outside]).all()
