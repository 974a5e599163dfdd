"""Synthesis modes: what each keeps and what it regenerates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfgm_jax.diffusion import sampler
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import modes


def _batch():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0.5, 1.0, (2, 16, 16, 1)), jnp.float32)
  h = jnp.asarray(rng.uniform(-0.5, 0.0, (2, 16, 16, 1)), jnp.float32)
  tumor = jnp.zeros((2, 16, 16, 1)).at[:, 6:10, 6:10].set(1.0)
  return x, tumor, h


def _eps(x, t, c, r, m):
  return jnp.cos(2 * x)


@pytest.mark.parametrize("mode", ["cutpaste", "anomalydiffusion", "dfgm", "dfgm_inner"])
def test_each_mode_keeps_what_it_should(mode):
  x, tumor, h = _batch()
  sched = schedule_lib.make_schedule("linear", 30)
  scfg = sampler.SamplerConfig(steps=6, jump_length=2, resamples=2)
  out = np.asarray(jax.jit(lambda x, t, h: modes.synthesize_batch(
      mode, _eps, sched, scfg, x, t, h, jax.random.key(0), jnp.arange(2), 2, 1))(x, tumor, h))
  m = np.asarray(tumor) > 0
  d = np.asarray(masks.dilate(tumor, 2)) > 0
  x, h = np.asarray(x), np.asarray(h)
  if mode == "cutpaste":
    np.testing.assert_array_equal(out[m], x[m])
    np.testing.assert_array_equal(out[~m], h[~m])
  elif mode == "anomalydiffusion":
    np.testing.assert_array_equal(out[~d], h[~d])       # healthy outside D.
    assert not np.allclose(out[m], x[m])                 # the tumor is not kept.
  elif mode == "dfgm":
    np.testing.assert_array_equal(out[m], x[m])          # tumor kept exactly.
    np.testing.assert_array_equal(out[~d], h[~d])        # background kept exactly.
    assert not np.array_equal(out[d & ~m], h[d & ~m])    # the ring is generated.
  else:  # dfgm_inner regenerates a band inside the tumor too.
    inner = np.asarray(masks.erode(tumor, 1)) > 0
    np.testing.assert_array_equal(out[inner], x[inner])
    np.testing.assert_array_equal(out[~d], h[~d])
    assert not np.array_equal(out[m & ~inner], x[m & ~inner])


def test_unknown_and_real_only():
  assert not modes.uses_diffusion("cutpaste") and modes.uses_diffusion("dfgm")
  with pytest.raises(ValueError):
    modes.uses_diffusion("magic")
  x, tumor, h = _batch()
  with pytest.raises(ValueError, match="produces no images"):
    modes.known_and_region("real_only", x, tumor, h, 2)


@pytest.mark.parametrize("mode", ["anomalydiffusion", "dfgm", "dfgm_inner"])
def test_outside_the_region_is_exact_whatever_the_network_returns(mode):
  """Issue 11 item 16: a NaN from the network stays inside the generated region."""
  x, tumor, h = _batch()
  sched = schedule_lib.make_schedule("linear", 30)
  scfg = sampler.SamplerConfig(steps=3, resamples=1)  # no jumps: a quick compile.
  nan_eps = lambda x, t, c, r, m: jnp.full_like(x, jnp.nan)
  out = np.asarray(jax.jit(lambda x, t, h: modes.synthesize_batch(
      mode, nan_eps, sched, scfg, x, t, h, jax.random.key(0), jnp.arange(2), 2, 1))(
          x, tumor, h))
  known, region = modes.known_and_region(mode, x, tumor, h, 2, 1)
  outside = np.broadcast_to(np.asarray(region) == 0, out.shape)
  np.testing.assert_array_equal(out[outside], np.asarray(known)[outside])
  assert np.isnan(out[~outside]).all()  # the failure shows where it happened.
