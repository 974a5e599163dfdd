"""FLOP counts of the denoiser: analytic (from its config) and XLA's.

Separate from unet.py because only benchmarks, profiling and tests need them,
and the analytic count mirrors the network's layout as a formula, which reads
best next to its check against XLA's count (`xla_flops_per_image`).
"""

from __future__ import annotations

from flax import nnx
import jax

from dfgm_jax.models import unet
from dfgm_jax.models.unet_config import UNetConfig


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


def xla_flops_per_image(model: unet.UNet, cfg: UNetConfig | None = None,
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
            for x in unet.example_inputs(cfg, batch)]
  cost = jax.jit(fwd).lower(abstract, *inputs).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"]) / batch
