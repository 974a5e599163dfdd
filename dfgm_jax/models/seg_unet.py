"""The downstream segmenter: the standard 2D UNet (Ronneberger layout), Flax NNX.

The layout of milesial/Pytorch-UNet (unet/unet_model.py, unet_parts.py), the
"standard UNet" of ALGORITHM.md 7:

  inc    DoubleConv(C_in, w)                       (conv3x3-BN-ReLU) x 2
  down_i MaxPool 2x2, DoubleConv(w 2^(i-1), w 2^i)   i = 1..depth
  up_i   ConvTranspose 2x2 stride 2 (or bilinear x2, align_corners), pad to
         the skip's size, concat [skip, up], DoubleConv
  head   Conv1x1 -> 1 logit

With `bilinear`, the bottom level and every up block but the last halve
their output width (milesial's `factor`), so the concatenation of skip and
up-sampled features has the width of the transposed-conv variant. At width
64 and depth 4 the transposed variant has about 31.0M parameters, the
bilinear one about 17.3M (1 input channel).

NHWC throughout; convolutions have no bias before a BatchNorm (as in the
reference); kernels use PyTorch's default initialisation (layers.py), so the
network starts as its PyTorch counterpart would, in distribution. BatchNorm
keeps running averages as nnx.BatchStat (PyTorch momentum 0.1 = Flax 0.9):
train mode normalises with the batch's statistics and updates them, eval
mode uses them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dfgm_jax import errors
from dfgm_jax.models import layers

BN_MOMENTUM = 0.9  # PyTorch BatchNorm2d's momentum=0.1.
BN_EPS = 1e-5
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class SegUNetConfig:
  """What the segmenter is.

  Attributes:
    in_channels: input channels (the modalities, T2 only by default).
    width: channels of the first level (64 at paper scale); level i has
      width * 2^i.
    depth: number of 2x down-samplings (4 in the reference).
    bilinear: bilinear up-sampling instead of 2x2 transposed convolutions.
    dtype: activation dtype name (parameters stay float32).
  """

  in_channels: int = 1
  width: int = 64
  depth: int = 4
  bilinear: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    if self.in_channels < 1:
      raise errors.ConfigError(
          f"config.data.modalities: {self.in_channels} modalities; need >= 1")
    if self.width < 1:
      raise errors.ConfigError(f"config.seg.width={self.width}: must be >= 1")
    if self.depth < 1:
      raise errors.ConfigError(f"config.seg.depth={self.depth}: must be >= 1")
    if self.bilinear and self.width < 2:
      raise errors.ConfigError(
          f"config.seg.width={self.width}: bilinear up-sampling halves "
          "widths, need >= 2")
    if self.dtype not in _DTYPES:
      raise errors.ConfigError(
          f"config.seg.dtype={self.dtype!r}: must be one of {sorted(_DTYPES)}")


def config_from(config) -> SegUNetConfig:
  """The segmenter of a full config: config.seg and config.data.modalities."""
  s = config.seg
  return SegUNetConfig(in_channels=len(config.data.modalities),
                       width=int(s.width), depth=int(s.depth),
                       bilinear=bool(s.bilinear), dtype=str(s.dtype))


# --- Layers --------------------------------------------------------------------

# PyTorch's ConvTranspose2d default: U(+-1/sqrt(fan_in)) with fan_in taken
# from its weight (C_in, C_out, k, k) as C_out * k * k. Flax's kernel is
# (k, k, C_in, C_out), so layers.torch_default would use C_in * k * k.
_transpose_default = layers.host_init(lambda rng, shape: rng.uniform(
    -1.0, 1.0, shape) / math.sqrt(shape[0] * shape[1] * shape[3]))


def _conv3(cin: int, cout: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """3x3 conv, padding 1, no bias (a BatchNorm follows)."""
  return nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=layers.torch_default, rngs=rngs)


def _batch_norm(channels: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Two-pass variance (as PyTorch): E[x^2] - E[x]^2 loses digits on the
  # large activations of the deep levels.
  return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                       dtype=dtype, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


def max_pool2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2; an odd last row/column is dropped (PyTorch)."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _interp_matrix(n: int) -> np.ndarray:
  """(2n, n) linear interpolation weights, align_corners=True."""
  out = 2 * n
  m = np.zeros((out, n), np.float32)
  if n == 1:
    m[:, 0] = 1.0
    return m
  pos = np.arange(out) * (n - 1) / (out - 1)
  lo = np.minimum(np.floor(pos).astype(int), n - 2)
  frac = pos - lo
  m[np.arange(out), lo] = 1.0 - frac
  m[np.arange(out), lo + 1] = frac
  return m


def upsample_bilinear(x: jax.Array) -> jax.Array:
  """2x bilinear up-sampling with align_corners=True (nn.Upsample as used by
  the reference); two small matmuls, separable along H and W."""
  _, h, w, _ = x.shape
  mh = jnp.asarray(_interp_matrix(h), x.dtype)
  mw = jnp.asarray(_interp_matrix(w), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", mh, x)
  return jnp.einsum("pw,bhwc->bhpc", mw, x)


def _pad_to(x: jax.Array, like: jax.Array) -> jax.Array:
  """Pads x (B,h,w,C) to like's H, W, split as in the reference (odd sizes)."""
  dy = like.shape[1] - x.shape[1]
  dx = like.shape[2] - x.shape[2]
  if dy == 0 and dx == 0:
    return x
  return jnp.pad(x, ((0, 0), (dy // 2, dy - dy // 2),
                     (dx // 2, dx - dx // 2), (0, 0)))


class DoubleConv(nnx.Module):
  """(Conv3x3 -> BatchNorm -> ReLU) x 2."""

  def __init__(self, cin: int, cout: int, *, mid: int | None = None,
               dtype: Any, rngs: nnx.Rngs):
    mid = mid or cout
    self.conv1 = _conv3(cin, mid, dtype, rngs)
    self.bn1 = _batch_norm(mid, dtype, rngs)
    self.conv2 = _conv3(mid, cout, dtype, rngs)
    self.bn2 = _batch_norm(cout, dtype, rngs)

  def __call__(self, x, train: bool):
    x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    return jax.nn.relu(self.bn2(self.conv2(x), use_running_average=not train))


class Up(nnx.Module):
  """Up-sample x2, pad to the skip, concatenate [skip, up], DoubleConv."""

  def __init__(self, cin: int, cout: int, *, bilinear: bool, dtype: Any,
               rngs: nnx.Rngs):
    self.bilinear = bilinear
    if bilinear:
      self.up = None
      self.conv = DoubleConv(cin, cout, mid=cin // 2, dtype=dtype, rngs=rngs)
    else:
      self.up = nnx.ConvTranspose(
          cin, cin // 2, (2, 2), strides=(2, 2), padding="VALID",
          dtype=dtype, param_dtype=jnp.float32,
          kernel_init=_transpose_default,
          bias_init=_transpose_bias(cin // 2 * 4), rngs=rngs)
      self.conv = DoubleConv(cin, cout, dtype=dtype, rngs=rngs)

  def __call__(self, x, skip, train: bool):
    x = upsample_bilinear(x) if self.bilinear else self.up(x)
    x = _pad_to(x, skip)
    return self.conv(jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1),
                     train)


def _transpose_bias(fan_in: int):
  """PyTorch's default bias init of a layer with this fan_in."""
  return layers.host_init(lambda rng, shape: rng.uniform(
      -1.0, 1.0, shape) / math.sqrt(fan_in))


# --- The network -----------------------------------------------------------------


class SegUNet(nnx.Module):
  """x (B,H,W,C_in) in [-1, 1] -> logits (B,H,W,1), float32."""

  def __init__(self, cfg: SegUNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = _DTYPES[cfg.dtype]
    w = [cfg.width * 2 ** i for i in range(cfg.depth + 1)]
    factor = 2 if cfg.bilinear else 1
    self.inc = DoubleConv(cfg.in_channels, w[0], dtype=dtype, rngs=rngs)
    downs = []
    for i in range(1, cfg.depth + 1):
      cout = w[i] // factor if i == cfg.depth else w[i]
      downs.append(DoubleConv(w[i - 1], cout, dtype=dtype, rngs=rngs))
    self.down = nnx.List(downs)
    ups = []
    for i in range(cfg.depth, 0, -1):
      cout = w[i - 1] if i == 1 else w[i - 1] // factor
      ups.append(Up(w[i], cout, bilinear=cfg.bilinear, dtype=dtype, rngs=rngs))
    self.up = nnx.List(ups)
    # 1x1 head with its bias (as the reference's OutConv).
    self.head = nnx.Conv(w[0], 1, (1, 1), dtype=jnp.float32,
                         param_dtype=jnp.float32,
                         kernel_init=layers.torch_default,
                         bias_init=_transpose_bias(w[0]), rngs=rngs)

  def __call__(self, x, train: bool = False):
    dtype = _DTYPES[self.cfg.dtype]
    h = self.inc(x.astype(dtype), train)
    skips = [h]
    for block in self.down:
      h = block(max_pool2(h), train)
      skips.append(h)
    skips.pop()  # The bottom level is `h` itself.
    for block in self.up:
      h = block(h, skips.pop(), train)
    return self.head(h.astype(jnp.float32))


def create_model(cfg: SegUNetConfig, seed: int) -> SegUNet:
  """The segmenter initialised from `seed` (host-drawn, no compile)."""
  return SegUNet(cfg, rngs=nnx.Rngs(params=seed))


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (BatchNorm's running averages excluded)."""
  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
