"""Dice, HD95, pooled / per-patient Dice and the paired bootstrap gain.

Expected values are worked out by hand in the comments (and agree with the
reference values measured with DeepMind's surface-distance / MONAI in
shared/docs/ECOSYSTEM.md 10: 32 x 32, a 10 x 10 square at rows/cols 5-14).
"""

import numpy as np
import pytest

from dfgm_jax.eval import segmentation_metrics as sm

S = 32


def square(r0, c0, n=10, size=S):
  m = np.zeros((size, size), bool)
  m[r0:r0 + n, c0:c0 + n] = True
  return m


REF = square(5, 5)  # rows/cols 5..14, 100 px, border 36 px


def test_dice_shifted_squares_and_empty_rules():
  pred = np.stack([
      square(5, 7),      # shift (0,2): overlap 10x8 = 80 -> 2*80/200 = 0.8
      square(7, 7),      # shift (2,2): overlap 8x8 = 64 -> 128/200 = 0.64
      square(7, 7, 6),   # inner 6x6: overlap 36 -> 72/136 = 0.52941
      REF,               # identical -> 1
      np.zeros((S, S), bool),  # pred empty, ref not -> 0
  ])
  ref = np.stack([REF] * 5)
  np.testing.assert_allclose(sm.dice(pred, ref), [0.8, 0.64, 72 / 136, 1.0, 0.0])
  empty = np.zeros((2, S, S), bool)
  np.testing.assert_array_equal(sm.dice(empty, empty), [1.0, 1.0])  # both empty
  np.testing.assert_array_equal(sm.dice(np.stack([REF, REF]), empty), [0.0, 0.0])
  # (B,H,W,1) is accepted as (B,H,W).
  np.testing.assert_allclose(sm.dice(pred[:1, ..., None], ref[:1, ..., None]), [0.8])


def test_hd95_shift_0_2_by_hand():
  # Directed pred -> ref border distances of the 36 pred border pixels:
  #   top/bottom rows, cols 7..14 lie on ref's top/bottom border: 16 x 0;
  #   cols 15, 16: 1 and 2, twice (top and bottom): 2 x 1, 2 x 2;
  #   left column (col 7), rows 6..13: min(2 to ref's col 5, row distance to
  #   rows 5 / 14) = 1,2,2,2,2,2,2,1: 2 x 1, 6 x 2;
  #   right column (col 16), rows 6..13: 2 to ref's col 14: 8 x 2.
  # Sorted: 16 zeros, 4 ones, 16 twos; P95 at index 0.95*35 = 33.25 -> 2.
  # The reverse direction is the mirror image: 2. HD95 = 2.
  pred, ref = square(5, 7)[None], REF[None]
  np.testing.assert_allclose(sm.hd95(pred, ref, spacing_mm=1.0), [2.0])
  np.testing.assert_allclose(sm.hd95(pred, ref, spacing_mm=2.0), [4.0])
  # Default spacing: 240 mm / 32 px = 7.5 mm per pixel.
  np.testing.assert_allclose(sm.hd95(pred, ref), [15.0])
  # Anisotropic, columns of 0.5 mm: the 36 pred -> ref distances become
  # 16 x 0, 2 x 0.5 (col 15), 2 x 1 (col 16), 8 x 1 (left column: one
  # 0.5 mm-column pair = 1 mm across, >= 1 mm down), 8 x 1 (right column):
  # P95 at index 33.25 -> 1 mm; the mirror direction is the same.
  np.testing.assert_allclose(sm.hd95(pred, ref, spacing_mm=(1.0, 0.5)), [1.0])


def test_hd95_reference_values():
  # Values of ECOSYSTEM.md 10 (surface-distance / MONAI convention).
  pred = np.stack([square(7, 7), square(7, 7, 6)])
  ref = np.stack([REF, REF])
  # (2,2): sqrt(2^2+1^2) = 2.2361; inner 6x6: sqrt(2^2+2^2) = 2.8284.
  np.testing.assert_allclose(sm.hd95(pred, ref, 1.0), [np.sqrt(5), np.sqrt(8)], atol=1e-12)


def test_hd95_directed_not_pooled():
  # pred = REF plus a 2x2 blob at rows/cols 27..28. pred -> ref: 36 square
  # border pixels at 0, the blob's 4 pixels at distance to ref's corner (14,14):
  # sqrt(13^2+13^2) = 18.385, sqrt(13^2+14^2) = 19.105 (twice),
  # sqrt(14^2+14^2) = 19.799. 40 sorted values; P95 at index 0.95*39 = 37.05
  # -> 19.105 + 0.05*(19.105 - 19.105) = sqrt(365). ref -> pred: all 0.
  # The max of the two is sqrt(365) = 19.1050; pooling both directions (76
  # values, 72 zeros: index 71.25 -> 0.25*18.385 = 4.596) would be medpy's.
  pred = REF.copy()
  pred[27:29, 27:29] = True
  np.testing.assert_allclose(sm.dice(pred[None], REF[None]), [200 / 204])  # 0.9804
  np.testing.assert_allclose(sm.hd95(pred[None], REF[None], 1.0), [np.sqrt(365)])
  # Symmetric in its arguments.
  np.testing.assert_allclose(sm.hd95(REF[None], pred[None], 1.0), [np.sqrt(365)])


def test_hd95_empty_rules_and_single_pixels():
  empty = np.zeros((1, S, S), bool)
  one = np.zeros((1, S, S), bool)
  one[0, 10, 10] = True
  other = np.zeros((1, S, S), bool)
  other[0, 13, 14] = True  # 3 rows, 4 cols away: distance 5
  np.testing.assert_array_equal(sm.hd95(empty, empty), [0.0])
  # One empty: the image diagonal, 240*sqrt(2) mm by default, S*sqrt(2) at 1 mm.
  np.testing.assert_allclose(sm.hd95(one, empty), [240 * np.sqrt(2)])
  np.testing.assert_allclose(sm.hd95(empty, one, 1.0), [S * np.sqrt(2)])
  np.testing.assert_allclose(sm.hd95(one, other, 1.0), [5.0])
  np.testing.assert_array_equal(sm.hd95(one, one, 1.0), [0.0])
  np.testing.assert_array_equal(sm.dice(one, other), [0.0])
  np.testing.assert_array_equal(sm.dice(one, one), [1.0])


def test_pooled_and_per_patient_dice():
  empty = np.zeros((S, S), bool)
  pred = np.stack([REF, empty, square(5, 7), empty])
  ref = np.stack([REF, empty, REF, REF])
  ids = ["a", "a", "b", "b"]
  # Pooled over all: inter 100 + 80 = 180; sizes 200 + 0 + 200 + 100 = 500.
  assert sm.pooled_dice(pred, ref) == pytest.approx(360 / 500)
  # Patient a: 2*100/200 = 1. Patient b pools its voxels: inter 80,
  # sizes 200 + 100 -> 160/300 (its per-slice mean would be (0.8 + 0)/2 = 0.4).
  per = sm.per_patient_dice(pred, ref, ids)
  assert per == pytest.approx({"a": 1.0, "b": 160 / 300})
  assert sm.pooled_dice(np.zeros((2, S, S)), np.zeros((2, S, S))) == 1.0
  with pytest.raises(ValueError, match="patient_ids"):
    sm.per_patient_dice(pred, ref, ids[:3])


def test_relative_gain_point_and_degenerate_intervals():
  rng = np.random.default_rng(1)
  before = rng.uniform(0.2, 0.8, 12)
  ids = np.repeat(np.arange(4), 3)
  # A uniform +10 % on every slice: every resample's gain is 0.1 exactly.
  out = sm.relative_gain_ci(before, before * 1.1, ids, n_boot=200)
  assert out["gain"] == pytest.approx(0.1)
  assert out["low"] == pytest.approx(0.1) and out["high"] == pytest.approx(0.1)
  assert (out["n_patients"], out["n_slices"]) == (4, 12)
  # 0.51 -> 0.53 is +3.9 % as the paper reports it.
  flat = sm.relative_gain_ci(np.full(4, 0.51), np.full(4, 0.53), [0, 0, 1, 1], n_boot=10)
  assert flat["gain"] == pytest.approx(0.02 / 0.51)


def test_relative_gain_resamples_patients_not_slices():
  rng = np.random.default_rng(2)
  before = rng.uniform(0.3, 0.7, 20)
  after = before + rng.normal(0.02, 0.1, 20)
  # One patient: every resample draws that patient, i.e. all slices -> no spread.
  one = sm.relative_gain_ci(before, after, np.zeros(20, int), n_boot=300)
  assert one["low"] == pytest.approx(one["gain"]) and one["high"] == pytest.approx(one["gain"])
  # One patient per slice: the slices are resampled -> a real interval.
  each = sm.relative_gain_ci(before, after, np.arange(20), n_boot=300)
  assert each["low"] < each["gain"] < each["high"]
  assert each["gain"] == pytest.approx(one["gain"])


def test_relative_gain_matches_a_naive_bootstrap():
  rng = np.random.default_rng(3)
  ids = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4])  # unequal slice counts
  before = rng.uniform(0.2, 0.8, len(ids))
  after = np.clip(before + rng.normal(0.03, 0.1, len(ids)), 0, 1)
  out = sm.relative_gain_ci(before, after, ids, n_boot=500, seed=7, alpha=0.1)
  # The same draws, the slices of each drawn patient concatenated.
  draws = np.random.default_rng(7).integers(0, 5, size=(500, 5))
  gains = []
  for row in draws:
    sel = np.concatenate([np.flatnonzero(ids == p) for p in row])
    gains.append((after[sel].mean() - before[sel].mean()) / before[sel].mean())
  np.testing.assert_allclose([out["low"], out["high"]], np.percentile(gains, [5, 95]))
  assert out["n_seeds"] == 1


def test_relative_gain_resamples_seeds_with_the_patients():
  rng = np.random.default_rng(4)
  ids = np.repeat(np.arange(8), 4)  # 8 patients, 4 slices each
  before = rng.uniform(0.4, 0.6, 32)
  # Two seeds with opposite gains (+20 % and -18 %): the seed-averaged
  # after run is about the before run (+1 %), slice by slice.
  after = np.stack([before * 1.2, before * 0.82])
  befores = np.stack([before, before])
  out = sm.relative_gain_ci(befores, after, ids, n_boot=1000, seed=3)
  assert out["gain"] == pytest.approx(0.01) and out["n_seeds"] == 2
  assert out["low"] < 0 < out["high"]  # which seeds are drawn decides the sign.
  # The old interval (seeds averaged first, patients resampled) excluded 0.
  averaged = sm.relative_gain_ci(before, after.mean(axis=0), ids, n_boot=1000, seed=3)
  assert averaged["low"] > 0 and averaged["high"] - averaged["low"] < 1e-9
  assert out["high"] - out["low"] > 0.3
  # Deterministic in its seed; another seed draws other resamples.
  again = sm.relative_gain_ci(befores, after, ids, n_boot=1000, seed=3)
  assert (again["low"], again["high"]) == (out["low"], out["high"])
  other = sm.relative_gain_ci(befores, after, ids, n_boot=1000, seed=4)
  assert (other["low"], other["high"]) != (out["low"], out["high"])


def test_relative_gain_pairs_the_seeds_and_matches_a_naive_bootstrap():
  rng = np.random.default_rng(5)
  ids = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4])
  before = rng.uniform(0.2, 0.8, (3, len(ids)))
  after = np.clip(before + rng.normal(0.03, 0.1, before.shape), 0, 1)
  out = sm.relative_gain_ci(before, after, ids, n_boot=300, seed=9)
  # The same draws: patients first, then seeds; drawn seed i of after with
  # drawn seed i of before, every slice of each drawn patient.
  r = np.random.default_rng(9)
  patients = r.integers(0, 5, size=(300, 5))
  seeds = r.integers(0, 3, size=(300, 3))
  gains = []
  for prow, srow in zip(patients, seeds):
    sel = np.concatenate([np.flatnonzero(ids == p) for p in prow])
    b = np.concatenate([before[s][sel] for s in srow])
    a = np.concatenate([after[s][sel] for s in srow])
    gains.append((a.mean() - b.mean()) / b.mean())
  np.testing.assert_allclose([out["low"], out["high"]], np.percentile(gains, [2.5, 97.5]))
  assert out["before"] == pytest.approx(before.mean())


def test_evaluator_accumulates_batches():
  empty = np.zeros((S, S), bool)
  ref = np.stack([REF, empty, REF, REF])
  logits = np.where(np.stack([REF, empty, square(5, 7), empty]), 3.0, -3.0)[..., None]
  ev = sm.SegmentationEvaluator()
  ev.update(logits[:2], ref[:2, ..., None], ["a", "a"])
  ev.update(logits[2:], ref[2:], ["b", "b"])
  res = ev.result()
  assert res["dice"] == pytest.approx((1 + 1 + 0.8 + 0) / 4)
  assert res["dice_pooled"] == pytest.approx(360 / 500)
  assert res["dice_patient"] == pytest.approx((1 + 160 / 300) / 2)
  # HD95 at 7.5 mm/px: 0, 0, 2 px = 15 mm, one empty = 240*sqrt(2).
  assert res["hd95"] == pytest.approx((15 + 240 * np.sqrt(2)) / 4)
  assert (res["n_slices"], res["n_patients"]) == (4, 2)
  np.testing.assert_allclose(ev.per_slice()["dice"], [1, 1, 0.8, 0])
  # Probabilities are cut at 0.5 (0.4 would count as positive as a logit).
  probs = sm.SegmentationEvaluator(kind="probs")
  probs.update(np.where(REF, 0.6, 0.4)[None], REF[None], [0])
  assert probs.result()["dice"] == 1.0
  with pytest.raises(ValueError, match="no slices"):
    sm.SegmentationEvaluator().result()


def test_false_positives_on_tumor_free_slices_exact():
  # 4 tumor-free 8 x 8 slices of 2 patients: 0, 6, 0 and 10 predicted pixels.
  pred = np.zeros((4, 8, 8, 1), np.uint8)
  pred[1, 0, :6] = 1
  pred[3, 2:4, 1:6] = 1
  out = sm.false_positives(pred, ["p1", "p1", "p2", "p2"])
  assert out["per_slice"] == [0, 6, 0, 10]
  assert out["fp_pixels"] == 4.0                 # (6 + 10) / 4
  assert out["fp_fraction"] == 4.0 / 64          # of the 64-pixel slice
  assert out["slices_with_fp"] == 0.5            # 2 of 4 slices
  assert out["fp_mm2"] is None                   # no spacing given
  assert (out["n_slices"], out["n_patients"]) == (4, 2)
  # With a pixel spacing, the area in mm^2: 4 px of 1.5 x 2 mm.
  assert sm.false_positives(pred, list("abcd"), spacing_mm=(1.5, 2.0))["fp_mm2"] == 12.0
  # No prediction at all: no false positive.
  clean = sm.false_positives(np.zeros((3, 8, 8), bool), ["a", "a", "b"])
  assert clean["fp_pixels"] == 0.0 and clean["slices_with_fp"] == 0.0
  with pytest.raises(ValueError, match="no tumor-free slices"):
    sm.false_positives(np.zeros((0, 8, 8), bool), [])
