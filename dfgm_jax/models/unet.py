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
(flops.py: `flops_per_image`, 2 x MACs of convs, dense layers and attention
matmuls; `xla_flops_per_image` counts only non-padding taps, plus
elementwise work):

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

The module holds the network and its helpers; the config and presets live in
unet_config.py (JAX-free, re-exported here), the shared layers and blocks in
layers.py and blocks.py, FLOP counting in flops.py.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

from dfgm_jax.models import layers
from dfgm_jax.models.blocks import AttentionBlock
from dfgm_jax.models.blocks import call_res
from dfgm_jax.models.blocks import Downsample
from dfgm_jax.models.blocks import ResBlock
from dfgm_jax.models.blocks import Upsample
from dfgm_jax.models.unet_config import ATTENTION_IMPLS
from dfgm_jax.models.unet_config import DTYPE_NAMES
from dfgm_jax.models.unet_config import get_preset
from dfgm_jax.models.unet_config import NORM_IMPLS
from dfgm_jax.models.unet_config import PRESETS
from dfgm_jax.models.unet_config import UNetConfig

# The config names, re-exported: callers read them as unet.UNetConfig etc.
__all__ = [
    "ATTENTION_IMPLS", "DTYPE_NAMES", "NORM_IMPLS", "PRESETS", "UNetConfig",
    "get_preset", "UNet", "create_model", "abstract_model", "count_params",
    "example_inputs",
]


# ----------------------------------------------------------------------------
# The denoiser's own modules (the shared ones are in blocks.py).


class SpatialLevel(nnx.Module):
  """[m, M] at one level: Conv3x3-SiLU-Conv3x3-SiLU-Conv1x1 (zero-init)."""

  def __init__(self, hidden: int, cout: int, cfg: UNetConfig, *,
               rngs: nnx.Rngs):
    dt = cfg.compute_dtype
    self.conv1 = layers.conv(2, hidden, 3, dtype=dt, rngs=rngs)
    self.conv2 = layers.conv(hidden, hidden, 3, dtype=dt, rngs=rngs)
    # Zero-init (ControlNet style): training starts from the plain UNet.
    self.inject = layers.conv(hidden, cout, 1, dtype=dt, rngs=rngs, zero=True)

  def __call__(self, masks):
    h = layers.silu(self.conv1(masks))
    return self.inject(layers.silu(self.conv2(h)))


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


# ----------------------------------------------------------------------------
# The network.


class UNet(nnx.Module):
  """eps_theta(x_t, t, class, ring, tumor) -> predicted noise, (B, S, S, C)."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c0, temb, dt = cfg.base_channels, cfg.time_embed_dim, cfg.compute_dtype
    chans, resolutions = cfg.level_channels, cfg.level_resolutions
    counter = iter(range(1 << 30))  # Unique ResBlock indices for dropout keys.

    def res_block(cin, cout, updown=None):
      return ResBlock(cin, cout, emb_dim=temb, groups=cfg.gn_groups, dtype=dt,
                      norm_impl=cfg.norm_impl,
                      scale_shift_norm=cfg.scale_shift_norm,
                      dropout=cfg.dropout, index=next(counter), rngs=rngs,
                      updown=updown)

    def attention(c, r):
      return AttentionBlock(c, groups=cfg.gn_groups,
                            head_channels=cfg.head_channels, dtype=dt,
                            norm_impl=cfg.norm_impl,
                            attention_impl=cfg.attention_impl, resolution=r,
                            rngs=rngs)

    self.conv_in = layers.conv(cfg.in_channels + 2, c0, 3, dtype=dt, rngs=rngs)
    # Time MLP in float32: per-example vectors, negligible cost.
    self.time_fc1 = layers.linear(c0, temb, dtype=jnp.float32, rngs=rngs)
    self.time_fc2 = layers.linear(temb, temb, dtype=jnp.float32, rngs=rngs)
    self.class_embed = (
        nnx.Embed(cfg.num_classes, temb, param_dtype=jnp.float32,
                  embedding_init=layers.standard_normal, rngs=rngs)
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
                    else Downsample(ch, dtype=dt, rngs=rngs))
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
                    else Upsample(ch, dtype=dt, rngs=rngs))
      up.append(Level(res, attn, resample, r))
    self.up = nnx.List(up)
    assert not skips

    self.out_norm = layers.GroupNorm(ch, cfg.gn_groups, dtype=jnp.float32,
                                     impl=cfg.norm_impl)
    # Zero-init output; float32 for the noise estimate (64 -> C, cheap).
    self.out_conv = layers.conv(ch, cfg.in_channels, 3, dtype=jnp.float32,
                                rngs=rngs, zero=True)

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

    temb = self.time_fc2(layers.silu(
        self.time_fc1(layers.timestep_embedding(t, cfg.base_channels))))
    if self.class_embed is not None:
      temb = temb + self.class_embed(jnp.asarray(class_id, jnp.int32))
    emb = layers.silu(temb)  # Every ResBlock's projection starts with SiLU.

    masks = jnp.concatenate([ring, tumor], axis=-1).astype(jnp.float32)
    h = self.conv_in(jnp.concatenate(
        [x_t.astype(dt), ring.astype(dt), tumor.astype(dt)], axis=-1))

    hs = []
    for l, level in enumerate(self.down):
      if self.spatial is not None:
        # Injected into the state entering the level, so the skip carries it.
        if l:
          masks = layers.avgpool2(masks)
        h = h + self.spatial[l](masks.astype(dt))
      hs.append(h)  # conv_in or downsampler output.
      for i, block in enumerate(level.res):
        h = call_res(block, h, emb, key, cfg.remat)
        if len(level.attn):
          h = level.attn[i](h)
        hs.append(h)
      if level.resample is not None:
        h = call_res(level.resample, h, emb, key,
                     cfg.remat and cfg.resblock_updown)

    h = call_res(self.mid.res1, h, emb, key, cfg.remat)
    h = self.mid.attn(h)
    h = call_res(self.mid.res2, h, emb, key, cfg.remat)

    for level in self.up:
      for i, block in enumerate(level.res):
        h = call_res(block, jnp.concatenate([h, hs.pop()], axis=-1), emb,
                     key, cfg.remat)
        if len(level.attn):
          h = level.attn[i](h)
      if level.resample is not None:
        h = call_res(level.resample, h, emb, key,
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


def example_inputs(cfg: UNetConfig, batch: int = 1,
                   image_size: int | None = None) -> tuple[jax.Array, ...]:
  """Zero inputs (x_t, t, class_id, ring, tumor) with the right shapes."""
  s = image_size or cfg.image_size
  img = jnp.zeros((batch, s, s, cfg.in_channels), jnp.float32)
  mask = jnp.zeros((batch, s, s, 1), jnp.float32)
  return (img, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch,), jnp.int32), mask, mask)
