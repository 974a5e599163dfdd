"""Reusable blocks: the time-conditioned ResBlock, self-attention, resamplers.

The blocks of an ADM / diffusers-style UNet, configured by explicit widths
and dtypes rather than by the denoiser's UNetConfig, so that another network
(the segmentation UNet) can build from them. unet.py assembles them into the
denoiser; the parameter names inside each block (norm1, conv1, emb_proj, ...)
are part of the export format, as leaf paths such as
"down/0/res/0/conv1/kernel".
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from dfgm_jax.models import layers


class ResBlock(nnx.Module):
  """GN-SiLU-Conv3x3, time FiLM, GN-SiLU-Dropout-Conv3x3 (zero), skip.

  With `updown` ('up' or 'down') it also resamples both paths (ADM's
  resblock_updown), after the first GroupNorm/SiLU.
  """

  def __init__(self, cin: int, cout: int, *, emb_dim: int, groups: int,
               dtype: Any, rngs: nnx.Rngs, norm_impl: str = "auto",
               scale_shift_norm: bool = True, dropout: float = 0.0,
               index: int = 0, updown: str | None = None):
    """Builds the block.

    Args:
      cin: input channels.
      cout: output channels (a 1x1 conv skip when they differ).
      emb_dim: width of the (time + class) embedding fed to `__call__`.
      groups: GroupNorm groups.
      dtype: activation dtype of the convs and norms.
      rngs: parameter RNG streams.
      norm_impl: GroupNorm form, 'auto', 'channels' or 'groups'.
      scale_shift_norm: FiLM h * (1 + s) + b after the second GroupNorm
        (ADM); False adds the projected embedding before it (diffusers).
      dropout: dropout rate before the second conv.
      index: folded into the dropout key, so every block drops differently.
      updown: None, 'up' or 'down'.
    """
    self.norm1 = layers.GroupNorm(cin, groups, dtype=dtype, impl=norm_impl)
    self.conv1 = layers.conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    # The time projection stays float32: it is tiny and feeds the FiLM scale.
    proj_out = 2 * cout if scale_shift_norm else cout
    self.emb_proj = layers.linear(emb_dim, proj_out, dtype=jnp.float32,
                                  rngs=rngs)
    self.norm2 = layers.GroupNorm(cout, groups, dtype=dtype, impl=norm_impl)
    self.conv2 = layers.conv(cout, cout, 3, dtype=dtype, rngs=rngs, zero=True)
    self.skip = (layers.conv(cin, cout, 1, dtype=dtype, rngs=rngs)
                 if cin != cout else None)
    self.scale_shift_norm = scale_shift_norm
    self.rate = dropout
    self.index = index
    self.updown = updown

  def __call__(self, x, emb, dropout_key=None):
    h = self.norm1(x, act=True)
    if self.updown == "down":
      h, x = layers.avgpool2(h), layers.avgpool2(x)
    elif self.updown == "up":
      h, x = layers.upsample_nearest(h), layers.upsample_nearest(x)
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

  def __init__(self, channels: int, *, groups: int, head_channels: int,
               dtype: Any, rngs: nnx.Rngs, norm_impl: str = "auto",
               attention_impl: str | None = None, resolution: int):
    """Builds the block.

    Args:
      channels: input and output channels; a multiple of head_channels.
      groups: GroupNorm groups.
      head_channels: channels per attention head.
      dtype: activation dtype.
      rngs: parameter RNG streams.
      norm_impl: GroupNorm form, 'auto', 'channels' or 'groups'.
      attention_impl: `implementation` of jax.nn.dot_product_attention.
      resolution: spatial size the block sits at (kept for inspection).
    """
    self.norm = layers.GroupNorm(channels, groups, dtype=dtype,
                                 impl=norm_impl)
    self.qkv = layers.linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
    self.proj = layers.linear(channels, channels, dtype=dtype, rngs=rngs,
                              zero=True)
    self.num_heads = channels // head_channels
    self.impl = attention_impl
    self.resolution = resolution

  def __call__(self, x):
    b, h, w, c = x.shape
    n = self.num_heads
    qkv = self.qkv(self.norm(x).reshape(b, h * w, c))
    q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * n, c // n), 3, axis=2)
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
    return x + self.proj(out.reshape(b, h * w, c)).reshape(b, h, w, c)


class Downsample(nnx.Module):
  """Stride-2 Conv3x3 (diffusers Downsample2D, use_conv=True)."""

  def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, dtype=dtype, rngs=rngs,
                            stride=2)

  def __call__(self, x, emb=None, dropout_key=None):
    del emb, dropout_key  # Called like a ResBlock(updown='down').
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest 2x upsampling + Conv3x3 (diffusers Upsample2D, use_conv=True)."""

  def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x, emb=None, dropout_key=None):
    del emb, dropout_key  # Called like a ResBlock(updown='up').
    return self.conv(layers.upsample_nearest(x))


def call_res(block, x, emb, dropout_key, remat: bool):
  """block(x, emb, dropout_key), recomputed in the backward pass if `remat`."""
  if not remat:
    return block(x, emb, dropout_key)
  return nnx.remat(lambda b, *a: b(*a))(block, x, emb, dropout_key)
