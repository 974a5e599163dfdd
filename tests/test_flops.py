"""Tests of the denoiser's FLOP counts (dfgm_jax/models/flops.py)."""

import pytest

from dfgm_jax.models import flops
from dfgm_jax.models import unet as U

PEER_GFLOP = 31.1  # PERFORMANCE.md, torch FlopCounterMode at 128 x 128,
PEER_GFLOP_256 = 124.4  # and at 256 x 256.


def test_analytic_flops_match_the_peer_and_xla():
  peer = U.get_preset("peer")
  # torch's CPU FlopCounterMode run left out the attention matmuls.
  for size, gflop in ((128, PEER_GFLOP), (256, PEER_GFLOP_256)):
    assert flops.flops_per_image(peer, size, attention_matmuls=False) / 1e9 == \
        pytest.approx(gflop, rel=0.002)
  assert flops.flops_per_image(peer) > flops.flops_per_image(
      peer, attention_matmuls=False)
  # XLA counts only non-padding taps plus elementwise work: within a few %.
  tiny = U.create_model(U.get_preset("tiny"), 0)
  assert flops.xla_flops_per_image(tiny) == pytest.approx(
      flops.flops_per_image(tiny.cfg), rel=0.05)


@pytest.mark.parametrize("overrides", [
    dict(resblock_updown=True),
    dict(num_classes=0, use_spatial_encoder=False, scale_shift_norm=False),
])
def test_analytic_flops_follow_the_variants(overrides):
  # The formula mirrors the layout; XLA's count of the same variant agrees.
  cfg = U.get_preset("tiny", **overrides)
  model = U.abstract_model(cfg)
  assert flops.xla_flops_per_image(model) == pytest.approx(
      flops.flops_per_image(cfg), rel=0.05)
