"""Cut-paste composition and placement (dfgm_jax/synthesis/compose.py)."""

import numpy as np
import pytest

from dfgm_jax.synthesis import compose


def _case(s=32):
  yy, xx = np.mgrid[:s, :s]
  brain = (((yy - s / 2) / (0.42 * s)) ** 2 + ((xx - s / 2) / (0.35 * s)) ** 2 <= 1)
  brain = brain[..., None].astype(np.float32)
  tumor = np.zeros((s, s, 1), np.float32)
  tumor[14:19, 12:17] = 1
  x = np.where(tumor > 0, 0.9, np.where(brain > 0, 0.1, -1.0)).astype(np.float32)
  h = np.where(brain > 0, -0.2, -1.0).astype(np.float32)
  return x, tumor, h, brain


def test_cut_paste_is_exact():
  x, tumor, h, _ = _case()
  y = compose.cut_paste(x, tumor, h)
  m = tumor.astype(bool)
  np.testing.assert_array_equal(y[m], x[m])
  np.testing.assert_array_equal(y[~m], h[~m])


def test_random_shift_keeps_the_tumor_inside_the_brain():
  x, tumor, _, brain = _case()
  rng = np.random.default_rng(0)
  moved_any = False
  for _ in range(20):
    x2, t2, ok = compose.place(x, tumor, brain, rng, "random_shift", hflip=True)
    assert ok and t2.sum() == tumor.sum()
    assert (t2 * brain).sum() / t2.sum() >= 0.95
    np.testing.assert_array_equal(x2[t2 > 0], np.float32(0.9))  # moved with its mask.
    moved_any |= not np.array_equal(t2, tumor)
  assert moved_any


def test_same_placement_reports_tumor_outside_brain():
  x, tumor, _, brain = _case()
  empty = np.zeros_like(brain)
  _, _, ok = compose.place(x, tumor, empty, np.random.default_rng(0), "same")
  assert not ok
  with pytest.raises(ValueError, match="placement"):
    compose.place(x, tumor, brain, np.random.default_rng(0), "teleport")


def test_intensity_match_equalises_ring_means():
  x, tumor, h, _ = _case()
  ring = np.zeros_like(tumor)
  ring[12:21, 10:19] = 1
  ring[tumor > 0] = 0
  out = compose.match_intensity(x, h, ring)
  r = ring[..., 0] > 0
  assert abs((out[r] + 1).mean() - (h[r] + 1).mean()) < 1e-5


def _coin(flip):
  """A generator whose first draw says mirror (flip=True) or not."""
  for seed in range(100):
    if (np.random.default_rng(seed).random() < 0.5) == flip:
      return np.random.default_rng(seed)
  raise AssertionError("no seed")


@pytest.mark.parametrize("placement", ["same", "random_shift"])
def test_mirrored_tumor_outside_the_brain_is_placed_unmirrored(placement):
  # A brain on the left of the image only: the tumor (left) fits, its mirror
  # image (right) does not, and no shift of +-12 % brings it back.
  x, _, _, _ = _case()
  tumor = np.zeros_like(x)
  tumor[14:19, 4:9] = 1
  x = np.where(tumor > 0, np.float32(0.9), x)
  brain = np.zeros_like(tumor)
  brain[4:28, 2:14] = 1
  x2, t2, ok = compose.place(x, tumor, brain, _coin(True), placement, hflip=True)
  assert ok
  assert (t2 * brain).sum() / t2.sum() >= 0.95
  np.testing.assert_array_equal(x2[t2 > 0], np.float32(0.9))


@pytest.mark.parametrize("hflip", [False, True])
def test_no_placement_inside_the_brain_is_not_ok(hflip):
  x, tumor, _, _ = _case()
  empty = np.zeros_like(tumor)
  for seed in range(4):
    _, _, ok = compose.place(x, tumor, empty, np.random.default_rng(seed),
                             "random_shift", hflip=hflip)
    assert not ok
