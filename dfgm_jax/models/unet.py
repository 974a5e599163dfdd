"""The DFGM denoiser eps_theta(x_t, t, c, m, M): an ADM-style UNet, Flax NNX.

ALGORITHM.md section 4.3. The input is concat[x_t, ring m, tumor M] (NHWC). A
class embedding (0 healthy, 1 tumor boundary) is added to the timestep
embedding, ResBlocks use FiLM (ADM's use_scale_shift_norm), and a
zero-initialised SpatialEncoder injects [m, M] at every encoder level.

The layout (conv_in output, every ResBlock and every downsampler pushed as a
skip; num_res_blocks + 1 decoder blocks per level; Res-Attn-Res middle) is the
one of diffusers' UNet2DModel, the peer in PERFORMANCE.md. The `peer` preset
turns the DFGM additions off and is that network exactly (19,197,569
parameters, the same count as the diffusers model).

Parameter counts (measured with `jax.eval_shape`) and forward GFLOP per image
(`flops_per_image`: 2 x MACs of convs, dense layers and attention matmuls;
`xla_flops_per_image` counts only non-padding taps, plus elementwise work):

| preset | S   | params     | GFLOP  | XLA GFLOP |
|--------|-----|------------|--------|-----------|
| tiny   | 32  | 192,545    | 0.165  | 0.164     |
| small  | 128 | 20,216,129 | 31.82  | 31.42     |
| full   | 256 | 31,130,305 | 126.77 | 126.49    |
| large  | 128 | 96,397,953 | 141.44 | 138.85    |
| peer   | 128 | 19,197,569 | 31.30  | 30.89     |

Without the attention matmuls, which torch's CPU FlopCounterMode did not
count, `peer` gives 31.11 / 124.43 GFLOP at 128 / 256: PERFORMANCE.md's 31.1
/ 124.4. `small` has 5.3 % more parameters than the peer: FiLM doubles each
ResBlock's time projection (+953,984, ~0.001 GFLOP), the SpatialEncoder adds
64,064 (0.52 GFLOP at 128 x 128) and the class embedding 512.

Attention placement is fixed by `cfg.image_size`; the network is fully
convolutional, so it also runs at other sizes divisible by 2**(levels - 1)
(e.g. the peer's structure at 64 x 64: keep image_size=128, feed 64 x 64).

Usage (functional NNX under plain jax.jit, no nnx.jit; dropout takes an
explicit key, so the train step is a pure function of (params, batch, key)):

  model = create_model(get_preset("small"), rng=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch, key):
    net = nnx.merge(graphdef, params, rest)
    eps_hat = net(batch["x_t"], batch["t"], batch["class"], batch["ring"],
                  batch["tumor"], train=True, dropout_key=key)
    return jnp.mean((eps_hat - batch["eps"]) ** 2)

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch, key)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLS = (None, "xla", "cudnn")
NORM_IMPLS = ("auto", "channels", "groups")
GN_EPS = 1e-5  # PyTorch / ADM / diffusers default.


def silu(x):
  """x * sigmoid(x), with sigmoid written as 0.5 + 0.5 tanh(x / 2).

  The same function (max difference 5e-7 in float32); XLA:CPU lowers tanh to
  a cheap rational approximation where jax.nn.sigmoid costs an exp and a
  divide: GroupNorm + SiLU at 64 x 64 x 64, batch 4, 4.9 -> 2.9 ms; the whole
  `small` forward at 64 x 64, batch 4, 2-core CPU, medians of 10 alternating
  calls in three runs: 283/311/339 -> 276/279/327 ms (2-10 %).
  """
  return x * (0.5 + 0.5 * jnp.tanh(0.5 * x))


def _host_init(sample):
  """Wraps `sample(numpy_generator, shape)` as a JAX initializer.

  XLA:CPU spends ~0.2 s compiling each differently shaped jax.random draw, and
  a UNet has dozens: a tiny model took ~10 s to initialise. Drawing with
  numpy, seeded by the key's data, is instant; under jit / eval_shape the
  same draw runs as a pure_callback, so the values depend on the key only.
  """

  def init(key, shape, dtype=jnp.float32):
    shape = tuple(shape)

    def draw(key_data):
      rng = np.random.default_rng(np.asarray(key_data).ravel().tolist())
      return np.asarray(sample(rng, shape), dtype)

    data = jax.random.key_data(key)
    try:
      host = np.asarray(data)
    except jax.errors.TracerArrayConversionError:  # Under jit / eval_shape.
      return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), data)
    return jnp.asarray(draw(host))

  return init


zeros = nnx.initializers.zeros_init()
# PyTorch's default U(+-1/sqrt(fan_in)) (kaiming_uniform, a=sqrt(5)), as in
# ADM and the diffusers peer. fan_in = all but the output axis.
torch_default = _host_init(lambda rng, shape: rng.uniform(
    -1.0, 1.0, shape) / math.sqrt(math.prod(shape[:-1])))
standard_normal = _host_init(lambda rng, shape: rng.standard_normal(shape))


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the denoiser (ALGORITHM.md Appendix A, `unet`).

  Attributes:
    image_size: spatial size S of the (square) input; sets which levels carry
      attention.
    in_channels: image channels (the output has as many).
    base_channels: C0, channels of the first level.
    channel_mult: per-level multipliers of C0; one level per entry.
    num_res_blocks: ResBlocks per encoder level (decoder levels get one more).
    attention_resolutions: spatial sizes at which self-attention follows each
      ResBlock. Sizes that no level reaches are ignored (as in ADM), so a
      preset can be rescaled with `image_size=`. The middle block always has
      attention (ADM, diffusers).
    head_channels: channels per attention head.
    dropout: dropout rate inside ResBlocks (active only with a dropout key).
    gn_groups: GroupNorm groups.
    num_classes: class-embedding size (2: healthy / tumor boundary); 0 turns
      class conditioning off.
    use_spatial_encoder: inject [m, M] at every encoder level.
    spatial_encoder_channels: hidden width of the SpatialEncoder; 0 disables.
    scale_shift_norm: FiLM h * (1 + s) + b after the second GroupNorm (ADM);
      False adds the projected embedding before it (diffusers' default).
    resblock_updown: resample with ResBlocks (ADM's option) instead of a
      stride-2 conv / nearest upsample + conv.
    dtype: activation dtype, 'float32' or 'bfloat16'. Parameters are float32.
    attention_impl: `implementation` of jax.nn.dot_product_attention: None
      (XLA default), 'xla' or 'cudnn' (GPU, bfloat16 only).
    remat: recompute ResBlocks in the backward pass (jax.checkpoint).
    norm_impl: how GroupNorm is computed (the same function either way):
      'channels' (per-channel sums, tuned for XLA:CPU), 'groups' (the
      textbook (B,H,W,G,C/G) form, the one measured on the H100), 'auto'
      (channels on CPU, groups elsewhere).
  """

  image_size: int = 128
  in_channels: int = 1
  base_channels: int = 64
  channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (16, 8)
  head_channels: int = 64
  dropout: float = 0.1
  gn_groups: int = 32
  num_classes: int = 2
  use_spatial_encoder: bool = True
  spatial_encoder_channels: int = 32
  scale_shift_norm: bool = True
  resblock_updown: bool = False
  dtype: str = "float32"
  attention_impl: str | None = None
  remat: bool = False
  norm_impl: str = "auto"

  def __post_init__(self):
    # Configs arrive from ml_collections / JSON as lists; keep them hashable.
    object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
    object.__setattr__(self, "attention_resolutions",
                       tuple(self.attention_resolutions))
    levels = len(self.channel_mult)
    if levels < 1:
      raise ValueError("channel_mult must have at least one level")
    if self.image_size % 2 ** (levels - 1):
      raise ValueError(
          f"image_size={self.image_size} is not divisible by "
          f"2**{levels - 1} ({levels} levels in channel_mult)")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; expected one of {list(DTYPES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one "
                       f"of {ATTENTION_IMPLS}")
    if self.norm_impl not in NORM_IMPLS:
      raise ValueError(f"norm_impl={self.norm_impl!r}; expected one of {NORM_IMPLS}")
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      raise ValueError("attention_impl='cudnn' needs dtype='bfloat16'")
    for c in set(self.level_channels):
      if c % self.gn_groups:
        raise ValueError(f"{c} channels not divisible by gn_groups="
                         f"{self.gn_groups}")
    for c in set(self.attention_channels):
      if c % self.head_channels:
        raise ValueError(f"attention over {c} channels is not divisible by "
                         f"head_channels={self.head_channels}")
    if self.num_classes < 0:
      raise ValueError(f"num_classes={self.num_classes} < 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} not in [0, 1)")

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.base_channels

  @property
  def level_channels(self) -> tuple[int, ...]:
    return tuple(self.base_channels * m for m in self.channel_mult)

  @property
  def level_resolutions(self) -> tuple[int, ...]:
    return tuple(self.image_size // 2 ** l
                 for l in range(len(self.channel_mult)))

  @property
  def attention_levels(self) -> tuple[int, ...]:
    """Indices of the levels that carry attention."""
    return tuple(l for l, r in enumerate(self.level_resolutions)
                 if r in self.attention_resolutions)

  @property
  def attention_channels(self) -> tuple[int, ...]:
    # The middle block always has attention, at the last level's width.
    return tuple(self.level_channels[l] for l in self.attention_levels) + (
        self.level_channels[-1],)

  @property
  def spatial_encoder_enabled(self) -> bool:
    return self.use_spatial_encoder and self.spatial_encoder_channels > 0

  @property
  def entry_channels(self) -> tuple[int, ...]:
    """Channels of the hidden state entering each encoder level."""
    return (self.base_channels,) + self.level_channels[:-1]


PRESETS: dict[str, UNetConfig] = {
    # CPU tests: compiles and runs in seconds; one attention level at 16.
    "tiny": UNetConfig(
        image_size=32, base_channels=16, channel_mult=(1, 2),
        num_res_blocks=1, attention_resolutions=(16,), head_channels=16,
        dropout=0.0, gn_groups=8, spatial_encoder_channels=8,
        dtype="float32"),
    # Default (Appendix A); the network of the PERFORMANCE.md peer plus FiLM,
    # class embedding and SpatialEncoder.
    "small": UNetConfig(
        image_size=128, base_channels=64, channel_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2, attention_resolutions=(16, 8), head_channels=64,
        dropout=0.1, gn_groups=32, dtype="bfloat16"),
    # 256 x 256 (240 padded).
    "full": UNetConfig(
        image_size=256, base_channels=64, channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2, attention_resolutions=(16, 8), head_channels=64,
        dropout=0.1, gn_groups=32, dtype="bfloat16"),
    # ADM-128 widths (ALGORITHM.md: S = 128; at 256 the 8 x 8 attention would
    # not exist with five levels).
    "large": UNetConfig(
        image_size=128, base_channels=128, channel_mult=(1, 1, 2, 3, 4),
        num_res_blocks=2, attention_resolutions=(32, 16, 8),
        head_channels=64, dropout=0.1, gn_groups=32, dtype="bfloat16"),
    # diffusers UNet2DModel of bench/diffusers_repaint_bench.py, exactly:
    # additive time embedding, no class / spatial conditioning, no dropout.
    "peer": UNetConfig(
        image_size=128, base_channels=64, channel_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2, attention_resolutions=(16, 8), head_channels=64,
        dropout=0.0, gn_groups=32, num_classes=0, use_spatial_encoder=False,
        scale_shift_norm=False, dtype="bfloat16"),
}


def get_preset(name: str, **overrides: Any) -> UNetConfig:
  """Returns preset `name` with fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}; have {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------
# Layers.


def timestep_embedding(t: jax.Array, dim: int,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos, sin] of (B,) int or float timesteps (ADM)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period)
                  * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _conv(cin, cout, k, cfg, rngs, *, stride=1, zero=False, dtype=None):
  # Explicit symmetric padding: with stride 2, 'SAME' would pad (0, 1), unlike
  # PyTorch / ADM (1, 1).
  p = k // 2
  return nnx.Conv(
      cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)),
      dtype=dtype or cfg.compute_dtype, param_dtype=jnp.float32,
      kernel_init=zeros if zero else torch_default,
      rngs=rngs)


def _linear(din, dout, cfg, rngs, *, zero=False, dtype=None):
  return nnx.Linear(
      din, dout, dtype=dtype or cfg.compute_dtype, param_dtype=jnp.float32,
      kernel_init=zeros if zero else torch_default,
      rngs=rngs)


def _upsample_nearest(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def _avgpool2(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _spatial_sum(x: jax.Array) -> jax.Array:
  """(B,H,W,C) -> (B,C) sum over H, W, as XLA:CPU reduces it fast.

  Summing over a middle axis with a wide contiguous minor axis (8 pixels x C
  channels) vectorises; a plain sum over (H, W) is 8x slower on XLA:CPU
  (0.80 -> 0.10 ms at 4 x 64 x 64 x 64). Exact same sum up to order.
  """
  b, h, w, c = x.shape
  f = math.gcd(8, h * w)
  return x.reshape(b, h * w // f, f * c).sum(axis=1).reshape(b, f, c).sum(axis=1)


def _group_expand(groups: int, channels: int) -> jax.Array:
  """(G, C) 0/1 matrix that copies a per-group value to its channels."""
  return jnp.asarray(np.kron(np.eye(groups, dtype=np.float32),
                             np.ones((1, channels // groups), np.float32)))


class GroupNorm(nnx.Module):
  """GroupNorm with float32 statistics, optional FiLM and fused SiLU.

  Statistics and the affine / FiLM arithmetic run in float32 whatever the
  activation dtype; the result is cast to `dtype`. Two passes (mean, then
  the mean squared deviation), as accurate as the textbook form.

  Two ways to compute it (`impl`), the same function up to rounding:
  - 'groups': the textbook form on a (B,H,W,G,C/G) view; what the H100
    figures in the README were measured with.
  - 'channels': written for XLA:CPU's emitters, which are fast only on
    elementwise work whose operands broadcast along the contiguous channel
    axis: per-channel sums (`_spatial_sum`), group statistics on the tiny
    (B, G) arrays, copied back to channels with a 0/1 matmul (a dot is not
    fused into the big loop, so the per-channel coefficients are computed
    once, not per pixel), then one pass `silu(x * a + b)`. The 'groups' form
    made XLA:CPU index every pixel through the group split: GroupNorm + FiLM
    + SiLU at 4 x 64 x 64 x 64 went 2.4 -> 1.25 ms (2-core CPU, min of 30
    calls). On a GPU those small dots are extra kernels, and the form has
    not been measured there.
  - 'auto': 'channels' when tracing for the CPU backend, else 'groups'.
  """

  def __init__(self, channels: int, groups: int, *, dtype: Any,
               impl: str = "auto"):
    self.groups = groups
    self.dtype = dtype
    self.impl = impl
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x, *, film=None, act=False):
    impl = self.impl
    if impl == "auto":
      impl = "channels" if jax.default_backend() == "cpu" else "groups"
    if film is not None:
      film = tuple(f.reshape(x.shape[0], x.shape[-1]).astype(jnp.float32)
                   for f in film)
    y = (self._channels if impl == "channels" else self._groups)(
        x.astype(jnp.float32), film)
    if act:
      y = silu(y)
    return y.astype(self.dtype)

  def _groups(self, x, film):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, self.groups, c // self.groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(b, h, w, c)
    y = y * self.scale[...] + self.bias[...]
    if film is not None:
      s, t = film
      y = y * (1.0 + s[:, None, None, :]) + t[:, None, None, :]
    return y

  def _channels(self, x, film):
    b, h, w, c = x.shape
    g = self.groups
    expand = _group_expand(g, c)
    n = h * w * (c // g)

    def to_channels(v):  # (B, G) -> (B, C), exact (0/1 weights, f32 dot).
      return jnp.dot(v, expand, precision=jax.lax.Precision.HIGHEST)

    mean = to_channels(_spatial_sum(x).reshape(b, g, c // g).sum(-1) / n)
    dev = x - mean[:, None, None, :]
    var = _spatial_sum(jnp.square(dev)).reshape(b, g, c // g).sum(-1) / n
    inv = to_channels(jax.lax.rsqrt(var + GN_EPS))
    a = inv * self.scale[...]
    shift = self.bias[...] - mean * a
    if film is not None:  # y * (1 + s) + t, folded into the coefficients.
      s, t = film
      a = a * (1.0 + s)
      shift = shift * (1.0 + s) + t
    return x * a[:, None, None, :] + shift[:, None, None, :]


class ResBlock(nnx.Module):
  """GN-SiLU-Conv3x3, time FiLM, GN-SiLU-Dropout-Conv3x3 (zero), skip.

  With `updown` ('up' or 'down') it also resamples both paths (ADM's
  resblock_updown), after the first GroupNorm/SiLU.
  """

  def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, index: int,
               rngs: nnx.Rngs, updown: str | None = None):
    dt = cfg.compute_dtype
    self.norm1 = GroupNorm(cin, cfg.gn_groups, dtype=dt, impl=cfg.norm_impl)
    self.conv1 = _conv(cin, cout, 3, cfg, rngs)
    # The time projection stays float32: it is tiny and feeds the FiLM scale.
    proj_out = 2 * cout if cfg.scale_shift_norm else cout
    self.emb_proj = _linear(cfg.time_embed_dim, proj_out, cfg, rngs,
                            dtype=jnp.float32)
    self.norm2 = GroupNorm(cout, cfg.gn_groups, dtype=dt, impl=cfg.norm_impl)
    self.conv2 = _conv(cout, cout, 3, cfg, rngs, zero=True)
    self.skip = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None
    self.scale_shift_norm = cfg.scale_shift_norm
    self.rate = cfg.dropout
    self.index = index  # Folded into the dropout key: each block differs.
    self.updown = updown

  def __call__(self, x, emb, dropout_key=None):
    h = self.norm1(x, act=True)
    if self.updown == "down":
      h, x = _avgpool2(h), _avgpool2(x)
    elif self.updown == "up":
      h, x = _upsample_nearest(h), _upsample_nearest(x)
    h = self.conv1(h)
    e = self.emb_proj(emb)[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = self.norm2(h, film=(scale, shift), act=True)
    else:
      h = self.norm2(h.astype(jnp.float32) + e, act=True)
    if dropout_key is not None and self.rate > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, self.index),
                                  1.0 - self.rate, h.shape)
      h = jnp.where(keep, h / (1.0 - self.rate), 0).astype(h.dtype)
    h = self.conv2(h)
    if self.skip is not None:
      x = self.skip(x)
    return x + h


class AttentionBlock(nnx.Module):
  """GN, multi-head self-attention over H*W tokens, zero-init proj, residual."""

  def __init__(self, channels: int, cfg: UNetConfig, *, resolution: int,
               rngs: nnx.Rngs):
    self.norm = GroupNorm(channels, cfg.gn_groups, dtype=cfg.compute_dtype,
                          impl=cfg.norm_impl)
    self.qkv = _linear(channels, 3 * channels, cfg, rngs)
    self.proj = _linear(channels, channels, cfg, rngs, zero=True)
    self.num_heads = channels // cfg.head_channels
    self.impl = cfg.attention_impl
    self.resolution = resolution  # Spatial size at the config's image_size.

  def __call__(self, x):
    b, h, w, c = x.shape
    n = self.num_heads
    qkv = self.qkv(self.norm(x).reshape(b, h * w, c))
    q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * n, c // n), 3, axis=2)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
    return x + self.proj(out.reshape(b, h * w, c)).reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Stride-2 Conv3x3 (diffusers Downsample2D, use_conv=True)."""

  def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg, rngs, stride=2)

  def __call__(self, x, emb=None, dropout_key=None):
    del emb, dropout_key
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest 2x upsampling + Conv3x3 (diffusers Upsample2D, use_conv=True)."""

  def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg, rngs)

  def __call__(self, x, emb=None, dropout_key=None):
    del emb, dropout_key
    return self.conv(_upsample_nearest(x))


class SpatialLevel(nnx.Module):
  """[m, M] at one level: Conv3x3-SiLU-Conv3x3-SiLU-Conv1x1 (zero-init)."""

  def __init__(self, hidden: int, cout: int, cfg: UNetConfig, *,
               rngs: nnx.Rngs):
    self.conv1 = _conv(2, hidden, 3, cfg, rngs)
    self.conv2 = _conv(hidden, hidden, 3, cfg, rngs)
    # Zero-init (ControlNet style): training starts from the plain UNet.
    self.inject = _conv(hidden, cout, 1, cfg, rngs, zero=True)

  def __call__(self, masks):
    h = silu(self.conv1(masks))
    return self.inject(silu(self.conv2(h)))


class Level(nnx.Module):
  """One resolution of the encoder or decoder."""

  def __init__(self, res, attn, resample, resolution: int):
    self.res = nnx.List(res)
    self.attn = nnx.List(attn)  # Empty, or one per ResBlock.
    self.resample = resample  # Downsample / Upsample / ResBlock, or None.
    self.resolution = resolution


class MidBlock(nnx.Module):
  """ResBlock, attention, ResBlock at the lowest resolution."""

  def __init__(self, res1, attn, res2):
    self.res1, self.attn, self.res2 = res1, attn, res2


def _call_res(block, x, emb, dropout_key, remat):
  if not remat:
    return block(x, emb, dropout_key)
  return nnx.remat(lambda b, *a: b(*a))(block, x, emb, dropout_key)


# ----------------------------------------------------------------------------
# The network.


class UNet(nnx.Module):
  """eps_theta(x_t, t, class, ring, tumor) -> predicted noise, (B, S, S, C)."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c0, temb = cfg.base_channels, cfg.time_embed_dim
    chans, resolutions = cfg.level_channels, cfg.level_resolutions
    counter = iter(range(1 << 30))  # Unique ResBlock indices for dropout keys.

    def res_block(cin, cout, updown=None):
      return ResBlock(cin, cout, cfg, index=next(counter), rngs=rngs,
                      updown=updown)

    def attention(c, r):
      return AttentionBlock(c, cfg, resolution=r, rngs=rngs)

    self.conv_in = _conv(cfg.in_channels + 2, c0, 3, cfg, rngs)
    # Time MLP in float32: per-example vectors, negligible cost.
    self.time_fc1 = _linear(c0, temb, cfg, rngs, dtype=jnp.float32)
    self.time_fc2 = _linear(temb, temb, cfg, rngs, dtype=jnp.float32)
    self.class_embed = (
        nnx.Embed(cfg.num_classes, temb, param_dtype=jnp.float32,
                  embedding_init=standard_normal, rngs=rngs)
        if cfg.num_classes else None)
    self.spatial = (
        nnx.List([SpatialLevel(cfg.spatial_encoder_channels, c, cfg, rngs=rngs)
                  for c in cfg.entry_channels])
        if cfg.spatial_encoder_enabled else None)

    ch, skips, down = c0, [c0], []
    last = len(chans) - 1
    for l, (cout, r) in enumerate(zip(chans, resolutions)):
      res, attn = [], []
      for _ in range(cfg.num_res_blocks):
        res.append(res_block(ch, cout))
        ch = cout
        if l in cfg.attention_levels:
          attn.append(attention(ch, r))
        skips.append(ch)
      resample = None
      if l < last:
        resample = (res_block(ch, ch, "down") if cfg.resblock_updown
                    else Downsample(ch, cfg, rngs=rngs))
        skips.append(ch)
      down.append(Level(res, attn, resample, r))
    self.down = nnx.List(down)

    self.mid = MidBlock(res_block(ch, ch), attention(ch, resolutions[-1]),
                        res_block(ch, ch))

    up = []
    for l in reversed(range(len(chans))):
      cout, r = chans[l], resolutions[l]
      res, attn = [], []
      for _ in range(cfg.num_res_blocks + 1):
        res.append(res_block(ch + skips.pop(), cout))
        ch = cout
        if l in cfg.attention_levels:
          attn.append(attention(ch, r))
      resample = None
      if l > 0:
        resample = (res_block(ch, ch, "up") if cfg.resblock_updown
                    else Upsample(ch, cfg, rngs=rngs))
      up.append(Level(res, attn, resample, r))
    self.up = nnx.List(up)
    assert not skips

    self.out_norm = GroupNorm(ch, cfg.gn_groups, dtype=jnp.float32,
                              impl=cfg.norm_impl)
    # Zero-init output; float32 for the noise estimate (64 -> C, cheap).
    self.out_conv = _conv(ch, cfg.in_channels, 3, cfg, rngs, zero=True,
                          dtype=jnp.float32)

  def __call__(self, x_t, t, class_id, ring, tumor, *, train: bool = False,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Predicts the noise in x_t.

    Args:
      x_t: (B, S, S, in_channels) noisy images.
      t: (B,) int or float timesteps.
      class_id: (B,) int32 classes (0 healthy, 1 tumor boundary); ignored (may
        be None) when cfg.num_classes == 0.
      ring: (B, S, S, 1) float {0, 1} boundary ring m.
      tumor: (B, S, S, 1) float {0, 1} tumor mask M.
      train: apply dropout (needs `dropout_key` when cfg.dropout > 0).
      dropout_key: PRNG key for dropout; keeps the train step a pure
        function of (params, batch, key). Unused when `train` is False.

    Returns:
      (B, S, S, in_channels) float32 predicted noise.
    """
    cfg = self.cfg
    if x_t.shape[-1] != cfg.in_channels:
      raise ValueError(f"x_t has {x_t.shape[-1]} channels, the model "
                       f"expects in_channels={cfg.in_channels}")
    if x_t.shape[1] % 2 ** (len(cfg.channel_mult) - 1) or (
        x_t.shape[2] % 2 ** (len(cfg.channel_mult) - 1)):
      raise ValueError(f"spatial size {x_t.shape[1:3]} is not divisible by "
                       f"2**{len(cfg.channel_mult) - 1}")
    if train and cfg.dropout > 0 and dropout_key is None:
      raise ValueError("train=True with dropout > 0 needs a dropout_key")
    key = dropout_key if train and cfg.dropout > 0 else None
    dt = cfg.compute_dtype

    temb = self.time_fc2(silu(
        self.time_fc1(timestep_embedding(t, cfg.base_channels))))
    if self.class_embed is not None:
      temb = temb + self.class_embed(jnp.asarray(class_id, jnp.int32))
    emb = silu(temb)  # Every ResBlock's projection starts with SiLU.

    masks = jnp.concatenate([ring, tumor], axis=-1).astype(jnp.float32)
    h = self.conv_in(jnp.concatenate(
        [x_t.astype(dt), ring.astype(dt), tumor.astype(dt)], axis=-1))

    hs = []
    for l, level in enumerate(self.down):
      if self.spatial is not None:
        # Injected into the state entering the level, so the skip carries it.
        if l:
          masks = _avgpool2(masks)
        h = h + self.spatial[l](masks.astype(dt))
      hs.append(h)  # conv_in or downsampler output.
      for i, block in enumerate(level.res):
        h = _call_res(block, h, emb, key, cfg.remat)
        if len(level.attn):
          h = level.attn[i](h)
        hs.append(h)
      if level.resample is not None:
        h = _call_res(level.resample, h, emb, key,
                      cfg.remat and cfg.resblock_updown)

    h = _call_res(self.mid.res1, h, emb, key, cfg.remat)
    h = self.mid.attn(h)
    h = _call_res(self.mid.res2, h, emb, key, cfg.remat)

    for level in self.up:
      for i, block in enumerate(level.res):
        h = _call_res(block, jnp.concatenate([h, hs.pop()], axis=-1), emb,
                      key, cfg.remat)
        if len(level.attn):
          h = level.attn[i](h)
      if level.resample is not None:
        h = _call_res(level.resample, h, emb, key,
                      cfg.remat and cfg.resblock_updown)
    assert not hs

    return self.out_conv(self.out_norm(h, act=True)).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Helpers.


def create_model(cfg: UNetConfig, rng: int | jax.Array = 0) -> UNet:
  """Initialises a UNet from an int seed or a PRNG key."""
  return UNet(cfg, rngs=nnx.Rngs(params=rng))


def abstract_model(cfg: UNetConfig) -> UNet:
  """The UNet with ShapeDtypeStruct leaves (no memory, no compute)."""
  return nnx.eval_shape(lambda: create_model(cfg, 0))


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (works on concrete and abstract models)."""
  return sum(math.prod(x.shape)
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_image(cfg: UNetConfig, image_size: int | None = None, *,
                    attention_matmuls: bool = True) -> float:
  """Analytic forward FLOPs (2 x MACs) of one image.

  Counts convolutions (padding taps included), dense layers and the two
  attention matmuls; norms, activations and resampling are left out, as in
  torch's FlopCounterMode. The PERFORMANCE.md peer figures (31.1 / 124.4
  GFLOP at 128 / 256) are matched with attention_matmuls=False: that CPU
  FlopCounterMode run did not count scaled_dot_product_attention.

  Args:
    cfg: the network.
    image_size: spatial size; defaults to cfg.image_size. Attention stays at
      the levels chosen by cfg.image_size.
    attention_matmuls: count q k^T and attn v.

  Returns:
    FLOPs per image per network evaluation.
  """
  s0 = image_size or cfg.image_size
  c0, temb = cfg.base_channels, cfg.time_embed_dim
  chans = cfg.level_channels
  res = [s0 // 2 ** l for l in range(len(chans))]

  def conv(s, cin, cout, k):
    return 2.0 * s * s * k * k * cin * cout

  def resblock(s, cin, cout, updown=None):
    so = s * 2 if updown == "up" else s // 2 if updown == "down" else s
    f = conv(so, cin, cout, 3) + conv(so, cout, cout, 3)
    f += 2.0 * temb * cout * (2 if cfg.scale_shift_norm else 1)
    if cin != cout:
      f += conv(so, cin, cout, 1)
    return f

  def attention(s, c):
    n = s * s
    return 2.0 * n * c * 4 * c + (4.0 * n * n * c if attention_matmuls else 0)

  f = conv(s0, cfg.in_channels + 2, c0, 3) + 2.0 * (c0 * temb + temb * temb)
  if cfg.spatial_encoder_enabled:
    hid = cfg.spatial_encoder_channels
    for s, c in zip(res, cfg.entry_channels):
      f += conv(s, 2, hid, 3) + conv(s, hid, hid, 3) + conv(s, hid, c, 1)
  ch, skips = c0, [c0]
  for l, cout in enumerate(chans):
    for _ in range(cfg.num_res_blocks):
      f += resblock(res[l], ch, cout)
      ch = cout
      if l in cfg.attention_levels:
        f += attention(res[l], ch)
      skips.append(ch)
    if l < len(chans) - 1:
      f += (resblock(res[l], ch, ch, "down") if cfg.resblock_updown
            else conv(res[l + 1], ch, ch, 3))
      skips.append(ch)
  f += 2 * resblock(res[-1], ch, ch) + attention(res[-1], ch)
  for l in reversed(range(len(chans))):
    for _ in range(cfg.num_res_blocks + 1):
      f += resblock(res[l], ch + skips.pop(), chans[l])
      ch = chans[l]
      if l in cfg.attention_levels:
        f += attention(res[l], ch)
    if l > 0:
      f += (resblock(res[l], ch, ch, "up") if cfg.resblock_updown
            else conv(res[l - 1], ch, ch, 3))
  f += conv(s0, ch, cfg.in_channels, 3)
  return f


def example_inputs(cfg: UNetConfig, batch: int = 1,
                   image_size: int | None = None) -> tuple[jax.Array, ...]:
  """Zero inputs (x_t, t, class_id, ring, tumor) with the right shapes."""
  s = image_size or cfg.image_size
  img = jnp.zeros((batch, s, s, cfg.in_channels), jnp.float32)
  mask = jnp.zeros((batch, s, s, 1), jnp.float32)
  return (img, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch,), jnp.int32), mask, mask)


def xla_flops_per_image(model: UNet, cfg: UNetConfig | None = None,
                        batch: int = 1) -> float:
  """Forward FLOPs per image from XLA's cost analysis of the lowered HLO.

  Unlike `flops_per_image` it also counts elementwise work (norms,
  activations), so it comes out a few percent higher.
  """
  cfg = cfg or model.cfg
  graphdef, state = nnx.split(model)

  def fwd(state, *inputs):
    return nnx.merge(graphdef, state)(*inputs)

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          state)
  inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype)
            for x in example_inputs(cfg, batch)]
  cost = jax.jit(fwd).lower(abstract, *inputs).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"]) / batch
