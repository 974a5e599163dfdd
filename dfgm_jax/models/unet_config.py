"""The denoiser's hyper-parameters (UNetConfig) and its presets, without JAX.

Kept apart from unet.py so that configs/diffusion.py, which builds one
command-line override slot per UNetConfig field, loads without importing
JAX and Flax (about 1 s per binary start and per config read). Only
`UNetConfig.compute_dtype` needs jax.numpy, and imports it when called.
`dfgm_jax.models.unet` re-exports everything here, so
`unet.UNetConfig` / `unet.get_preset` keep working.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dfgm_jax.errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16")  # Activation dtypes (jax.numpy names).
ATTENTION_IMPLS = (None, "xla", "cudnn")
NORM_IMPLS = ("auto", "channels", "groups")


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
    # A bad value is the user's (a config or an override), not a bug.
    levels = len(self.channel_mult)
    if levels < 1:
      raise ConfigError("channel_mult must have at least one level")
    if self.image_size % 2 ** (levels - 1):
      raise ConfigError(
          f"image_size={self.image_size} is not divisible by "
          f"2**{levels - 1} ({levels} levels in channel_mult)")
    if self.dtype not in DTYPE_NAMES:
      raise ConfigError(
          f"dtype={self.dtype!r}; expected one of {list(DTYPE_NAMES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl={self.attention_impl!r}; expected one "
                        f"of {ATTENTION_IMPLS}")
    if self.norm_impl not in NORM_IMPLS:
      raise ConfigError(
          f"norm_impl={self.norm_impl!r}; expected one of {NORM_IMPLS}")
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      raise ConfigError("attention_impl='cudnn' needs dtype='bfloat16'")
    for c in set(self.level_channels):
      if c % self.gn_groups:
        raise ConfigError(f"{c} channels not divisible by gn_groups="
                          f"{self.gn_groups}")
    for c in set(self.attention_channels):
      if c % self.head_channels:
        raise ConfigError(f"attention over {c} channels is not divisible by "
                          f"head_channels={self.head_channels}")
    if self.num_classes < 0:
      raise ConfigError(f"num_classes={self.num_classes} < 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"dropout={self.dropout} not in [0, 1)")

  @property
  def compute_dtype(self) -> Any:
    """The activation dtype as a jax.numpy dtype (imports JAX when called)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return getattr(jnp, self.dtype)

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
    raise ConfigError(
        f"unknown UNet preset {name!r}; have {sorted(PRESETS)}")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(UNetConfig)}
  if unknown:  # Else a bare TypeError from dataclasses.replace.
    raise ConfigError(f"unknown UNetConfig field(s) {sorted(unknown)}")
  return dataclasses.replace(PRESETS[name], **overrides)
