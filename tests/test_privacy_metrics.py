"""Tests of the privacy audit's metric core (dfgm_jax/privacy, issue 14).

Small random images: the training set, held-out slices and "independent"
candidates are drawn from the same distribution, so every threshold taken
from the held-out slices should flag about 1 % of independent candidates and
all exact copies of training images.
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
  assert out["carlini_n"] == 50
  # The independent ones: about the held-out 1 % below each threshold.
  independent = np.arange(20, 300)
  assert len(set(nn["flagged"]) - set(copies)) == 0
  assert nn["heldout_fraction_flagged"] == 0.0
  assert len(set(carlini["below"]) & set(independent)) <= 10
  assert dcr["fraction_below"] <= (20 + 10) / 300
  assert dcr["heldout_p5"] > 0.5


def test_independent_set_not_flagged():
  rng = np.random.default_rng(5)
  train, heldout, cands = _images(rng, 60), _images(rng, 1000), _images(rng, 500)
  out = memorization.region_audit(cands, heldout, train)
  assert out["dcr"]["fraction_zero"] == 0.0
  assert out["dcr"]["fraction_below"] < 0.04
  assert out["nn_ratio"]["fraction_flagged"] == 0.0
  assert out["nn_ratio"]["median"] > 0.8
  assert out["carlini"]["fraction_below"] < 0.04
  # Drawn like the held-out slices: the same DCR distribution.
  assert out["dcr"]["candidate_median"] == pytest.approx(
      out["dcr"]["heldout_median"], rel=0.05)


def test_training_split_is_all_copies():
  rng = np.random.default_rng(6)
  train, heldout = _images(rng, 60), _images(rng, 100)
  out = memorization.region_audit(train, heldout, train)
  assert out["dcr"]["fraction_below"] == 1.0
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
      "dcr": memorization.dcr_summary(d[:, 0], h[:, 0]),
      "nn": memorization.nn_ratio_summary(d[:, 0], d[:, 1]),
      "carlini": memorization.carlini_summary(
          memorization.carlini_scores(d), memorization.carlini_scores(h)),
      "ring": memorization.source_ring_summary(d[:, 0], h[:20]),
  })
