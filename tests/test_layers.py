"""Tests of dfgm_jax/models/layers.py: GroupNorm, resampling."""

import jax.numpy as jnp
import numpy as np
import pytest

from dfgm_jax.models import layers


def _group_norm_reference(x, groups, scale, bias, film=None, act=False):
  """Textbook GroupNorm (+ FiLM, SiLU) in float64 numpy."""
  b, h, w, c = x.shape
  xg = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
  y = (xg - xg.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      xg.var(axis=(1, 2, 4), keepdims=True) + layers.GN_EPS)
  y = y.reshape(b, h, w, c) * scale + bias
  if film is not None:
    y = y * (1.0 + film[0]) + film[1]
  return y / (1.0 + np.exp(-y)) if act else y


@pytest.mark.parametrize("shape,groups,offset", [
    ((2, 16, 16, 64), 32, 0.0),
    ((2, 8, 8, 128), 32, 0.0),
    ((3, 2, 2, 32), 8, 0.0),      # H*W = 4 < the 8-pixel fold.
    ((2, 8, 8, 64), 32, 1000.0),  # a large mean: two passes keep the variance.
])
@pytest.mark.parametrize("with_film", [False, True])
@pytest.mark.parametrize("impl", ["channels", "groups"])
def test_group_norm_matches_textbook_form(shape, groups, offset, with_film, impl):
  rng = np.random.default_rng(0)
  b, _, _, c = shape
  x = (rng.standard_normal(shape) * 3.0 + offset).astype(np.float32)
  # Per-channel offsets too, so that channels of one group differ in mean.
  x += rng.standard_normal(c).astype(np.float32)
  norm = layers.GroupNorm(c, groups, dtype=jnp.float32, impl=impl)
  norm.scale.value = jnp.asarray(rng.standard_normal(c), jnp.float32)
  norm.bias.value = jnp.asarray(rng.standard_normal(c), jnp.float32)
  film = None
  if with_film:
    film = tuple(rng.standard_normal((b, 1, 1, c)).astype(np.float32) * 0.1
                 for _ in range(2))
  got = norm(jnp.asarray(x), film=film, act=True)
  want = _group_norm_reference(x, groups, np.asarray(norm.scale.value),
                               np.asarray(norm.bias.value), film=film, act=True)
  assert got.shape == shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-3 if offset else 2e-5)


@pytest.mark.parametrize("impl", ["channels", "groups"])
def test_group_norm_bfloat16_output_close(impl):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 8, 64)).astype(np.float32)
  norm = layers.GroupNorm(64, 32, dtype=jnp.bfloat16, impl=impl)
  got = norm(jnp.asarray(x, jnp.bfloat16), act=False)
  want = _group_norm_reference(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), 32,
                               1.0, 0.0)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.03)


def test_group_norm_refuses_an_unknown_impl():
  # Before the check, any misspelt impl silently computed the 'groups' form.
  with pytest.raises(ValueError, match="impl"):
    layers.GroupNorm(32, 8, dtype=jnp.float32, impl="channel")


def test_resampling_round_trip():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  up = layers.upsample_nearest(x)
  assert up.shape == (2, 8, 12, 3)
  np.testing.assert_array_equal(up[:, 1::2, ::2], x)
  np.testing.assert_array_equal(layers.avgpool2(up), x)
  want = np.asarray(x).reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(layers.avgpool2(x), want)
