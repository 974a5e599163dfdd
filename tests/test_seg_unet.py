"""The segmenter network: shapes, parameter count, BatchNorm modes, resampling."""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import data as data_cfg
from configs import segmentation as seg_cfg
from dfgm_jax import errors
from dfgm_jax.models import seg_unet


def reference_param_count(cin, width, depth, bilinear):
  """milesial/Pytorch-UNet's count, written out from its layer list."""

  def double_conv(a, b, mid=None):
    mid = mid or b
    return 9 * a * mid + 2 * mid + 9 * mid * b + 2 * b  # convs (no bias), BN

  w = [width * 2 ** i for i in range(depth + 1)]
  factor = 2 if bilinear else 1
  n = double_conv(cin, w[0])
  for i in range(1, depth + 1):
    n += double_conv(w[i - 1], w[i] // factor if i == depth else w[i])
  for i in range(depth, 0, -1):
    out = w[i - 1] if i == 1 else w[i - 1] // factor
    if bilinear:
      n += double_conv(w[i], out, mid=w[i] // 2)
    else:
      n += 4 * w[i] * (w[i] // 2) + w[i] // 2  # ConvTranspose 2x2 + bias
      n += double_conv(w[i], out)
  return n + w[0] + 1  # 1x1 head with bias


@pytest.mark.parametrize("bilinear", [False, True])
def test_parameter_count_matches_the_reference_layout(bilinear):
  for cin, width, depth in ((1, 4, 2), (4, 8, 3)):
    model = seg_unet.create_model(seg_unet.SegUNetConfig(
        in_channels=cin, width=width, depth=depth, bilinear=bilinear), 0)
    assert seg_unet.count_params(model) == reference_param_count(
        cin, width, depth, bilinear)
  # Paper scale (shapes only): about 31M / 17M parameters (ALGORITHM.md 7).
  big = nnx.eval_shape(lambda: seg_unet.create_model(
      seg_unet.SegUNetConfig(width=64, bilinear=bilinear), 0))
  n = seg_unet.count_params(big)
  assert n == reference_param_count(1, 64, 4, bilinear)
  assert abs(n - (17.3e6 if bilinear else 31.0e6)) < 0.1e6


@pytest.mark.parametrize("bilinear", [False, True])
def test_shapes_four_modalities_and_odd_sizes(bilinear):
  model = seg_unet.create_model(seg_unet.SegUNetConfig(
      in_channels=4, width=4, depth=4, bilinear=bilinear), 0)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 4)),
                  jnp.float32)
  y = model(x, train=True)
  assert y.shape == (2, 32, 32, 1) and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  # 30 -> 15 -> 7 -> 3 -> 1: the up path pads to each skip (as the reference).
  assert model(x[:, :30, :30], train=False).shape == (2, 30, 30, 1)


def test_batchnorm_train_mode_updates_averages_eval_mode_uses_them():
  model = seg_unet.create_model(seg_unet.SegUNetConfig(width=4, depth=2), 0)
  x = jnp.asarray(np.random.default_rng(0).normal(2.0, 1.0, (4, 16, 16, 1)),
                  jnp.float32)
  before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  np.testing.assert_array_equal(before["inc"]["bn1"]["mean"].value, 0.0)
  eval_out = model(x, train=False)
  np.testing.assert_array_equal(  # eval mode leaves the averages alone
      nnx.state(model, nnx.BatchStat)["inc"]["bn1"]["mean"].value, 0.0)
  # Eval mode: an image's output does not depend on the rest of the batch.
  np.testing.assert_allclose(model(x[:1], train=False), eval_out[:1],
                             atol=1e-5)
  train_out = model(x, train=True)
  mean = np.asarray(nnx.state(model, nnx.BatchStat)["inc"]["bn1"]["mean"].value)
  # PyTorch momentum 0.1: running = 0.9 * 0 + 0.1 * batch mean.
  conv_out = model.inc.conv1(x)
  np.testing.assert_allclose(mean, 0.1 * np.asarray(conv_out).mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  # Train mode normalises with the batch's statistics.
  assert not np.allclose(model(x[:1], train=True), train_out[:1], atol=1e-3)


def test_bilinear_upsampling_aligns_corners():
  ramp = jnp.arange(5, dtype=jnp.float32)
  x = jnp.broadcast_to(ramp[None, :, None, None] + 10 * ramp[None, None, :, None],
                       (1, 5, 5, 2))
  y = np.asarray(seg_unet.upsample_bilinear(x))
  assert y.shape == (1, 10, 10, 2)
  # A linear ramp stays linear, corners on corners: linspace(0, 4, 10).
  expected = np.linspace(0, 4, 10)
  np.testing.assert_allclose(y[0, :, 0, 0], expected, atol=1e-5)
  np.testing.assert_allclose(y[0, 0, :, 1], 10 * expected, atol=1e-4)


def test_max_pool_drops_an_odd_edge():
  x = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
  np.testing.assert_array_equal(
      np.asarray(seg_unet.max_pool2(x))[0, :, :, 0], [[6, 8], [16, 18]])


def test_config_from_a_full_config():
  config = ml_collections.ConfigDict()
  config.data = data_cfg.get_data_config()
  config.seg = seg_cfg.get_seg_config()
  cfg = seg_unet.config_from(config)
  assert cfg == seg_unet.SegUNetConfig(in_channels=len(config.data.modalities),
                                       width=64, depth=4, bilinear=False)
  config.data.modalities = ("t1", "t1ce", "t2", "flair")
  config.seg.bilinear = True
  assert seg_unet.config_from(config).in_channels == 4
  config.seg.dtype = "float16"
  with pytest.raises(errors.ConfigError, match="seg.dtype"):
    seg_unet.config_from(config)


def test_initialisation_is_the_seeds():
  cfg = seg_unet.SegUNetConfig(width=4, depth=1)
  k = lambda seed: np.asarray(
      seg_unet.create_model(cfg, seed).inc.conv1.kernel.value)
  np.testing.assert_array_equal(k(3), k(3))
  assert not np.allclose(k(3), k(4))
  # PyTorch's default bound 1/sqrt(fan_in), fan_in = 3 * 3 * 1.
  assert np.abs(k(3)).max() <= 1 / 3 and np.abs(k(3)).max() > 0.2
