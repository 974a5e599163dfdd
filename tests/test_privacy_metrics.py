"""Tests of the privacy audit's metric core (dfgm_jax/privacy, issue 14).

Small random images: the training set, held-out slices and "independent"
candidates are drawn from the same distribution, so every threshold taken
from the held-out slices should put at most its quantile (5 %) of independent
candidates below it, never beyond chance, and flag all exact copies of
training images. The aligned distance is checked against a brute-force numpy
twin; the planted near copies and the seeded clean draws are in
test_copy_checks.py.
"""

import numpy as np
import pytest

from dfgm_jax import errors
from dfgm_jax.privacy import distances
from dfgm_jax.privacy import memorization

SIDE = 12


def _images(rng, n):
  return rng.uniform(-1.0, 1.0, size=(n, SIDE, SIDE)).astype(np.float32)


def _ring_masks(n):
  """A square ring around a square tumor, the same for every image."""
  tumor = np.zeros((n, SIDE, SIDE), np.float32)
  ring = np.zeros((n, SIDE, SIDE), np.float32)
  ring[:, 3:9, 3:9] = 1
  tumor[:, 5:7, 5:7] = 1
  return tumor, ring


@pytest.mark.parametrize("chunk_q,chunk_r", [(1, 1), (5, 7), (4, 64),
                                             (32, 10)])
def test_chunked_matches_unchunked(chunk_q, chunk_r):
  rng = np.random.default_rng(0)
  queries, refs = _images(rng, 13), _images(rng, 37)
  masks = rng.uniform(size=queries.shape) < 0.5
  for m in (None, masks):
    want_d, want_i = distances.nearest_reference(queries, refs, m, k=3)
    got_d, got_i = distances.nearest(queries, refs, m, k=3, chunk_q=chunk_q,
                                     chunk_r=chunk_r)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_i, want_i)
    assert np.all(np.diff(got_d, axis=1) >= 0)


def test_distances_to_matches_reference():
  rng = np.random.default_rng(1)
  queries, refs = _images(rng, 11), _images(rng, 9)
  masks = rng.uniform(size=queries.shape) < 0.5
  index = rng.integers(0, 9, size=(11, 4))
  got = distances.distances_to(queries, refs, index, masks, chunk_q=4)
  m = masks.reshape(11, -1)
  diff = queries.reshape(11, 1, -1) - refs.reshape(9, -1)[index]
  want = np.sqrt((m[:, None] * diff.astype(np.float64)**2).sum(-1)
                 / m.sum(-1)[:, None])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_regions_mask_correctly():
  rng = np.random.default_rng(2)
  refs = _images(rng, 5)
  tumor, ring = _ring_masks(5)
  regions = distances.region_masks(tumor, ring)
  # Ring and tumor do not overlap; the four regions cover the image.
  np.testing.assert_array_equal(
      regions["ring"] + regions["tumor"] + regions["background"],
      regions["full"])
  # Change each reference only outside its ring: ring distance stays 0.
  queries = np.where(regions["ring"] > 0, refs, _images(rng, 5))
  d_ring, i_ring = distances.nearest(queries, refs, regions["ring"], k=2)
  d_full, _ = distances.nearest(queries, refs, None, k=2)
  np.testing.assert_array_equal(d_ring[:, 0], 0.0)
  np.testing.assert_array_equal(i_ring[:, 0], np.arange(5))
  assert np.all(d_ring[:, 1] > 0)
  assert np.all(d_full[:, 0] > 0.1)
  d_bg, _ = distances.nearest(queries, refs, regions["background"], k=2)
  assert np.all(d_bg[:, 0] > 0.1)


def test_empty_region_refused():
  rng = np.random.default_rng(3)
  masks = np.ones((3, SIDE, SIDE))
  masks[1] = 0
  with pytest.raises(errors.UserError, match="empty region"):
    distances.nearest(_images(rng, 3), _images(rng, 4), masks)


def test_copies_flagged_independent_not():
  rng = np.random.default_rng(4)
  train, heldout = _images(rng, 60), _images(rng, 300)
  copied = rng.choice(60, size=20, replace=False)
  candidates = np.concatenate([train[copied], _images(rng, 280)])
  copies = np.arange(20)

  out = memorization.region_audit(candidates, heldout, train)
  dcr, nn, carlini = out["dcr"], out["nn_ratio"], out["carlini"]
  # The copies: DCR 0 at their own source, ratio 0, Carlini below threshold.
  np.testing.assert_array_equal(out["nearest_distance"][:20], 0.0)
  np.testing.assert_array_equal(out["nearest_index"][:20], copied)
  assert dcr["fraction_zero"] == pytest.approx(20 / 300)
  assert set(copies) <= set(carlini["below"])
  assert [i for i, _ in carlini["smallest"][:16]] == list(copies[:16])
  assert set(copies) <= set(nn["flagged"])
  assert out["copies"]["copies"] == list(copies) and out["copies"]["n_exact"] == 20
  assert out["carlini_n"] == 50
  # The independent ones: at most about the held-out 5 % below each threshold.
  independent = np.arange(20, 300)
  assert len(set(nn["flagged"]) - set(copies)) == 0
  assert nn["heldout_fraction_flagged"] == 0.0
  assert len(set(carlini["below"]) & set(independent)) <= 0.08 * 280
  assert len(set(dcr["below"]) & set(independent)) <= 0.08 * 280
  assert dcr["heldout_p5"] > 0.5
  # 300 held-out slices, each its own patient: the reference calibrates.
  assert not out["reference"]["too_small"] and out["reference"]["n_patients"] == 300
  assert dcr["threshold_low"] <= dcr["threshold"] <= dcr["threshold_high"]


def test_independent_set_not_flagged():
  rng = np.random.default_rng(5)
  train, heldout, cands = _images(rng, 60), _images(rng, 1000), _images(rng, 500)
  out = memorization.region_audit(cands, heldout, train)
  assert out["dcr"]["fraction_zero"] == 0.0
  assert out["dcr"]["fraction_below"] <= 0.06 and not out["dcr"]["exceeds"]
  assert out["nn_ratio"]["fraction_flagged"] == 0.0
  assert out["nn_ratio"]["median"] > 0.8
  assert out["copies"]["n"] == 0
  assert out["carlini"]["fraction_below"] <= 0.06 and not out["carlini"]["exceeds"]
  # Drawn like the held-out slices: the same DCR distribution.
  assert out["dcr"]["candidate_median"] == pytest.approx(
      out["dcr"]["heldout_median"], rel=0.05)


def test_training_split_is_all_copies():
  rng = np.random.default_rng(6)
  train, heldout = _images(rng, 60), _images(rng, 100)
  out = memorization.region_audit(train, heldout, train)
  assert out["dcr"]["fraction_below"] == 1.0 and out["dcr"]["exceeds"]
  assert out["copies"]["fraction"] == 1.0
  assert out["nn_ratio"]["fraction_flagged"] == 1.0
  assert out["carlini"]["fraction_below"] == 1.0
  np.testing.assert_array_equal(out["nearest_index"], np.arange(60))


def test_source_ring_replication():
  rng = np.random.default_rng(7)
  tumor_slices = _images(rng, 70)
  _, ring = _ring_masks(70)
  source = rng.permutation(70)[:30]
  fresh = _images(rng, 30)
  # A copied ring: the source's ring pixels, everything else new.
  copied = np.where(ring[:30] > 0, tumor_slices[source], fresh)
  out = memorization.source_ring_replication(copied, ring[:30], tumor_slices,
                                             source)
  assert out["fraction_replicated"] == 1.0
  assert out["ratio_median"] == 0.0
  assert out["n_other"] == 50
  out = memorization.source_ring_replication(fresh, ring[:30], tumor_slices,
                                             source)
  assert out["fraction_replicated"] == 0.0
  assert out["ratio_median"] == pytest.approx(1.0, abs=0.15)


def test_other_indices_exclude_source():
  source = np.array([0, 5, 9, 9])
  others = memorization.other_indices(source, 10, n_other=50, seed=1)
  assert others.shape == (4, 9)
  for s, row in zip(source, others):
    assert s not in row and len(set(row)) == 9


def test_summaries_are_json_serialisable():
  import json  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(8)
  d = np.sort(rng.uniform(size=(20, 5)), axis=1)
  h = np.sort(rng.uniform(size=(30, 5)), axis=1)
  json.dumps({
      "dcr": memorization.dcr_summary(d[:, 0], h[:, 0], np.arange(30) // 3),
      "copies": memorization.copy_summary(d[:, 0], d[:, 1], h[:, 0], h[:, 1]),
      "nn": memorization.nn_ratio_summary(d[:, 0], d[:, 1]),
      "carlini": memorization.carlini_summary(
          memorization.carlini_scores(d), memorization.carlini_scores(h)),
      "ring": memorization.source_ring_summary(d[:, 0], h[:20]),
  })


# --- The aligned distance ------------------------------------------------------


def _moved(images, dy, dx, fill=-1.0):
  """Images shifted by (dy, dx) pixels, `fill` brought in (not wrapped)."""
  out = np.full_like(images, fill)
  h, w = images.shape[1:3]
  out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = images[
      :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


@pytest.mark.parametrize("chunk_q,chunk_r", [(1, 1), (4, 5), (32, 64)])
def test_aligned_matches_brute_force(chunk_q, chunk_r):
  rng = np.random.default_rng(10)
  queries, refs = _images(rng, 7), _images(rng, 9)
  masks = rng.uniform(size=queries.shape) < 0.6
  for m in (None, masks):
    want_d, want_i = distances.nearest_aligned_reference(queries, refs, m, k=3)
    got_d, got_i, got_t = distances.nearest_aligned(queries, refs, m, k=3,
                                                    chunk_q=chunk_q, chunk_r=chunk_r)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_i, want_i)
    assert np.all(np.diff(got_d, axis=1) >= 0)
    assert got_t.shape == (7, 3) and got_t.min() >= 0 and got_t.max() < 8 * 25


def test_aligned_without_transforms_is_plain_rmse():
  rng = np.random.default_rng(11)
  queries, refs = _images(rng, 6), _images(rng, 8)
  masks = rng.uniform(size=queries.shape) < 0.5
  want_d, want_i = distances.nearest(queries, refs, masks, k=3)
  got_d, got_i, got_t = distances.nearest_aligned(queries, refs, masks, k=3, max_shift=0,
                                                  flips=False, rotations=False)
  np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_i, want_i)
  assert set(got_t.ravel()) == {0}


def test_aligned_distance_sees_moved_copies_at_zero():
  rng = np.random.default_rng(12)
  refs = _images(rng, 10)
  queries = np.stack([refs[0], np.flip(refs[1], 1), np.flip(refs[2], 0),
                      np.rot90(refs[3], 1), np.rot90(refs[4], 3),
                      _moved(refs[5:6], 1, -2)[0], _moved(refs[6:7], -2, 2)[0]])
  d_plain, _ = distances.nearest(queries, refs, k=2)
  d, i, t = distances.nearest_aligned(queries, refs, k=2)
  names = distances.transform_names(SIDE, SIDE)
  np.testing.assert_array_equal(d[:, 0], 0.0)  # exact after the recomputation.
  np.testing.assert_array_equal(i[:, 0], np.arange(7))
  assert np.all(d_plain[1:, 0] > 0.5)  # the plain RMSE sees none of them.
  assert [names[x] for x in t[:, 0]] == [
      "as is", "mirrored", "mirrored, 180 deg", "270 deg", "90 deg", "shift (-1, 2)",
      "shift (2, -2)"]
  # Rectangular images: half turns only, and still a mirrored copy at 0.
  wide = rng.uniform(-1, 1, size=(4, 8, 12)).astype(np.float32)
  d, i, _ = distances.nearest_aligned(np.flip(wide, 1), wide, k=1)
  np.testing.assert_array_equal(d[:, 0], 0.0)
  assert len(distances.orientations(8, 12)) == 4 and len(distances.orientations(8, 8)) == 8


def test_aligned_refuses_what_it_cannot_compare():
  rng = np.random.default_rng(17)
  with pytest.raises(errors.UserError, match="queries of shape"):
    distances.nearest_aligned(_images(rng, 2), rng.uniform(size=(3, 10, 12)))
  with pytest.raises(errors.UserError, match="expected \\(N, H, W\\)"):
    distances.nearest_aligned(rng.uniform(size=(2, 144)), rng.uniform(size=(3, 144)))
  with pytest.raises(errors.ConfigError, match="max_shift=-1"):
    distances.nearest_aligned(_images(rng, 2), _images(rng, 3), max_shift=-1)
  masks = np.ones((2, SIDE, SIDE))
  masks[1] = 0
  with pytest.raises(errors.UserError, match="empty region"):
    distances.nearest_aligned(_images(rng, 2), _images(rng, 3), masks)


def test_aligned_region_mask_moves_with_its_image():
  # A training image whose ring differs from the query's only outside the
  # query's (moved) ring: the ring distance is 0, the full image's is not.
  rng = np.random.default_rng(13)
  refs = _images(rng, 4)
  _, ring = _ring_masks(1)
  moved_ring = _moved(ring, 1, 1, fill=0.0)[0]
  query = np.where(moved_ring > 0, _moved(refs[2:3], 1, 1)[0], _images(rng, 1)[0])
  d_ring, i_ring, _ = distances.nearest_aligned(query[None], refs, moved_ring[None], k=1)
  d_full, _, _ = distances.nearest_aligned(query[None], refs, None, k=1)
  assert d_ring[0, 0] == 0.0 and i_ring[0, 0] == 2
  assert d_full[0, 0] > 0.3
  # A region pushed mostly out of the image by every transform is not
  # compared on its few remaining pixels.
  edge = np.zeros((1, SIDE, SIDE), np.float32)
  edge[0, :, 0] = 1
  d, _, _ = distances.nearest_aligned(refs[:1], refs, edge, k=1, min_overlap=1.0)
  assert d[0, 0] == 0.0  # as is keeps the whole column.


# --- Calibration over held-out patients ----------------------------------------


def test_threshold_interval_resamples_patients():
  rng = np.random.default_rng(14)
  # 4 patients of 10 slices, each patient's values around its own level.
  levels = np.array([0.2, 0.4, 0.6, 0.8])
  patients = np.repeat(np.arange(4), 10)
  values = levels[patients] + rng.normal(0, 0.01, 40)
  by_patient = memorization.threshold_interval(values, patients, quantile=0.05, seed=0)
  by_slice = memorization.threshold_interval(values, None, quantile=0.05, seed=0)
  assert by_patient["n_patients"] == 4 and by_slice["n_patients"] == 40
  assert by_patient["low"] <= by_patient["threshold"] <= by_patient["high"]
  # Resampling patients sees that the next patient may sit at another level.
  assert by_patient["high"] - by_patient["low"] > 0.3
  assert by_slice["high"] - by_slice["low"] < 0.05
  again = memorization.threshold_interval(values, patients, quantile=0.05, seed=0)
  assert again == by_patient


def test_resampled_quantiles_equal_numpy_on_the_repeated_values():
  rng = np.random.default_rng(16)
  values = rng.uniform(size=37)
  units = np.unique(rng.integers(0, 6, 37), return_inverse=True)[1]
  counts = rng.integers(0, 3, (40, units.max() + 1))
  counts[:, 0] += 1  # never an empty draw.
  for q in (0.01, 0.05, 0.5, 0.99):
    want = [np.quantile(np.concatenate([np.repeat(values[units == g], c)
                                        for g, c in enumerate(row)]), q) for row in counts]
    got = memorization._weighted_quantiles(values, units, counts, q)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_clustered_candidates_need_more_than_one_close_patient():
  # 10 held-out patients of 6 slices; candidates of 5 patients of 6 slices.
  rng = np.random.default_rng(15)
  held = rng.uniform(0.5, 1.0, 60)
  patients = np.repeat(np.arange(10), 6)
  groups = np.repeat(np.arange(5), 6)
  one_close = rng.uniform(0.5, 1.0, 30)
  one_close[:6] = 0.3  # one candidate patient below every held-out slice.
  by_group = memorization.dcr_summary(one_close, held, patients, groups)
  assert by_group["fraction_below"] >= 0.2 and by_group["candidate_groups"] == 5
  # 20 % below the held-out 5th percentile, but all of it one patient of
  # five: a patient like that could as well have been held out.
  assert by_group["p_value"] > 0.01 and not by_group["exceeds"]
  lo, hi = by_group["fraction_below_interval"]
  assert lo <= by_group["fraction_below"] <= hi and hi - lo > 0.15
  all_close = np.full(30, 0.3)
  every = memorization.dcr_summary(all_close, held, patients, groups)
  assert every["exceeds"] and every["p_value"] < 0.01


def test_small_reference_neither_warns_nor_uses_the_margin():
  d = np.full(20, 0.1)
  h = np.full(12, 0.5)
  small = memorization.dcr_summary(d, h, np.repeat(np.arange(3), 4))
  assert small["reference_too_small"] and not small["exceeds"]
  assert small["fraction_below"] == 1.0  # measured, but not called a warning.
  large = memorization.dcr_summary(d, h, np.arange(12))
  assert large["exceeds"] and not large["reference_too_small"]
  # Copies: the margin rule (0.1 < 0.5 x 0.5) only with a usable reference.
  far = np.full(20, 1.0)
  assert memorization.copy_summary(d, far, h, use_margin=True)["n_margin"] == 20
  off = memorization.copy_summary(d, far, h, use_margin=False)
  assert off["n_margin"] == 0 and off["n_ratio"] == 20 and off["copy_distance"] is None
  none = memorization.copy_summary(d, np.full(20, 0.2), h, use_margin=False)
  assert none["n"] == 0
