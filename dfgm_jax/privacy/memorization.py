"""Memorization metrics of the privacy audit (ALGORITHM.md section 9, 1-4).

Every metric compares candidates (synthetic images, or any real split) with
the private training set, and takes its threshold from the same center's
held-out test slices measured against the same training set: a held-out
slice is a real image the model never saw, so "closer to the training set
than almost any held-out slice" is the warning sign. No threshold is
hard-coded except the NN-ratio rule rho < 1/3 of Gu et al. 2023, which is a
ratio, not a distance.

  dcr_summary                distance to closest record vs held-out slices.
  nn_ratio_summary           d1/d2, copies flagged at rho < 1/3.
  carlini_scores/_summary    Carlini et al. 2023 calibrated distance.
  other_indices              50 other tumor slices per candidate (seeded).
  source_ring_summary        ring distance to own source vs to other slices.
  region_audit               the first three for one region, from images.

Every summary is a dict of plain floats/ints/lists (JSON-serialisable).
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from dfgm_jax import errors
from dfgm_jax.privacy import distances

COPY_RATIO = 1.0 / 3.0
CARLINI_N = 50
CARLINI_ALPHA = 0.5
N_OTHER = 50


def _q(values: np.ndarray, pct: float) -> float:
  return float(np.percentile(values, pct))


def _nonempty(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise errors.UserError(f"{name}: no values (empty set)")
  return values


def dcr_summary(candidate_d1, heldout_d1) -> Dict[str, float]:
  """Distance to closest record (DCR) of candidates against held-out slices.

  Args:
    candidate_d1: (Nc,) each candidate's RMSE to its nearest training image.
    heldout_d1: (Nh,) the same for held-out test slices of the same center.

  Returns:
    candidate_median, candidate_p5: the candidates' DCR median and 5th
      percentile. Warning sign: clearly below the held-out ones.
    heldout_median, heldout_p5: the reference population's.
    threshold: the held-out 1st percentile of DCR.
    fraction_below: fraction of candidates with DCR < threshold. About 0.01
      for candidates drawn like the held-out slices; much more is a warning
      sign (1.0 with DCR 0 = copies of training images).
    fraction_zero: fraction of candidates at DCR 0 (exact copies).
    n_candidates, n_heldout.
  """
  c = _nonempty("dcr candidates", candidate_d1)
  h = _nonempty("dcr held-out", heldout_d1)
  threshold = _q(h, 1)
  return {
      "candidate_median": _q(c, 50),
      "candidate_p5": _q(c, 5),
      "heldout_median": _q(h, 50),
      "heldout_p5": _q(h, 5),
      "threshold": threshold,
      "fraction_below": float(np.mean(c < threshold)),
      "fraction_zero": float(np.mean(c == 0)),
      "n_candidates": int(c.size),
      "n_heldout": int(h.size),
  }


def nn_ratios(d1, d2) -> np.ndarray:
  """rho = d1/d2; 0 when d1 = 0 (a copy, even of a duplicated image)."""
  d1 = np.asarray(d1, np.float64)
  d2 = np.asarray(d2, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    rho = np.where(d1 == 0, 0.0, d1 / d2)
  return rho


def nn_ratio_summary(d1,
                     d2,
                     copy_ratio: float = COPY_RATIO,
                     heldout_d1=None,
                     heldout_d2=None) -> Dict[str, object]:
  """Nearest-neighbour ratio rho = d1/d2 (Gu et al. 2023).

  A candidate much closer to one training image than to the next one is a
  copy of it: flagged when rho < copy_ratio (1/3).

  Returns:
    fraction_flagged: fraction of candidates flagged as copies. Warning sign:
      above the held-out slices' fraction (near 0 for real unseen images).
    n_flagged, flagged (candidate indices), median, p5: rho's distribution.
    heldout_fraction_flagged, heldout_median (when held-out d1, d2 given).
  """
  rho = nn_ratios(_nonempty("nn ratio d1", d1), _nonempty("nn ratio d2", d2))
  flagged = np.flatnonzero(rho < copy_ratio)
  out = {
      "copy_ratio": float(copy_ratio),
      "fraction_flagged": float(flagged.size / rho.size),
      "n_flagged": int(flagged.size),
      "flagged": [int(i) for i in flagged],
      "median": _q(rho, 50),
      "p5": _q(rho, 5),
  }
  if heldout_d1 is not None and heldout_d2 is not None:
    h = nn_ratios(_nonempty("held-out d1", heldout_d1),
                  _nonempty("held-out d2", heldout_d2))
    out["heldout_fraction_flagged"] = float(np.mean(h < copy_ratio))
    out["heldout_median"] = _q(h, 50)
  return out


def carlini_scores(dists, n: int = CARLINI_N,
                   alpha: float = CARLINI_ALPHA) -> np.ndarray:
  """Carlini et al. 2023 calibrated distance, as ALGORITHM.md section 9.3.

  l = d_1 / (alpha * mean_{j<=n} d_j), with d_j the j-th smallest distance of
  the image to the training set: a candidate that is much closer to its
  nearest training image than to its n nearest on average scores low.
  0 when d_1 = 0.

  Args:
    dists: (N, >=n) ascending nearest distances (`distances.nearest` with
      k >= n); with fewer columns than n all of them are used.
    n: neighbours averaged (50).
    alpha: calibration factor (0.5).
  """
  dists = np.asarray(dists, np.float64)
  if dists.ndim != 2 or dists.shape[1] < 1:
    raise errors.UserError(f"carlini: dists shape {dists.shape}, expected "
                           "(N, k) ascending distances")
  if n < 1 or alpha <= 0:
    raise errors.ConfigError(f"carlini: n={n} must be >= 1, alpha={alpha} > 0")
  d1 = dists[:, 0]
  mean = dists[:, :n].mean(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(d1 == 0, 0.0, d1 / (alpha * mean))


def carlini_summary(candidate_scores,
                    heldout_scores,
                    n_smallest: int = 16) -> Dict[str, object]:
  """Carlini scores of candidates against the held-out calibration.

  Returns:
    threshold: the held-out 1st percentile of the score (never hard-coded).
    fraction_below: fraction of candidates scoring below it. About 0.01 for
      candidates drawn like held-out slices; more is a warning sign.
    n_below, below (candidate indices), median, p5: the distribution.
    heldout_median.
    smallest: the n_smallest candidates as [index, score], lowest first
      (the ones to look at in the figure).
  """
  c = _nonempty("carlini candidates", candidate_scores)
  h = _nonempty("carlini held-out", heldout_scores)
  threshold = _q(h, 1)
  below = np.flatnonzero(c < threshold)
  order = np.argsort(c, kind="stable")[:n_smallest]
  return {
      "threshold": threshold,
      "fraction_below": float(below.size / c.size),
      "n_below": int(below.size),
      "below": [int(i) for i in below],
      "median": _q(c, 50),
      "p5": _q(c, 5),
      "heldout_median": _q(h, 50),
      "smallest": [[int(i), float(c[i])] for i in order],
  }


def other_indices(source_index,
                  n_refs: int,
                  n_other: int = N_OTHER,
                  seed: int = 0) -> np.ndarray:
  """(Nc, n_other) distinct reference indices != each candidate's source.

  Drawn with a fixed seed, so the audit is reproducible; with fewer than
  n_other + 1 references all the others are used.
  """
  src = np.asarray(source_index, np.int64).ravel()
  if src.size and (src.min() < 0 or src.max() >= n_refs):
    raise errors.UserError(f"source-ring: source indices outside [0, {n_refs})")
  n_other = min(int(n_other), n_refs - 1)
  if n_other < 1:
    raise errors.UserError("source-ring: needs at least 2 tumor slices")
  rng = np.random.default_rng(seed)
  out = np.empty((src.size, n_other), np.int64)
  for row, s in enumerate(src):
    pick = rng.choice(n_refs - 1, size=n_other, replace=False)
    out[row] = pick + (pick >= s)  # skip the source index
  return out


def source_ring_summary(d_source, d_others,
                        copy_ratio: float = COPY_RATIO) -> Dict[str, object]:
  """Source-ring replication (DFGM-specific, ALGORITHM.md section 9.4).

  Args:
    d_source: (Nc,) RMSE_ring(candidate, its own source slice).
    d_others: (Nc, n) RMSE_ring(candidate, n other tumor slices).
    copy_ratio: ratio under which a ring counts as replicated (1/3, the same
      rule as the NN ratio).

  Returns:
    ratio_median, ratio_p5, ratio_min: distribution of d_source /
      median(d_others). Near 1: the ring is no closer to its source than to
      other slices. Much smaller (warning sign): G1 copied the source ring.
    source_median, others_median: the two distances' medians.
    fraction_replicated, replicated: candidates with ratio < copy_ratio.
  """
  src = _nonempty("source-ring d_source", d_source)
  others = np.asarray(d_others, np.float64)
  if others.ndim != 2 or others.shape[0] != src.size or others.shape[1] < 1:
    raise errors.UserError(f"source-ring: d_others shape {others.shape}, "
                           f"expected ({src.size}, n)")
  ref = np.median(others, axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(src == 0, 0.0, src / ref)
  replicated = np.flatnonzero(ratio < copy_ratio)
  return {
      "ratio_median": _q(ratio, 50),
      "ratio_p5": _q(ratio, 5),
      "ratio_min": float(ratio.min()),
      "source_median": _q(src, 50),
      "others_median": _q(ref, 50),
      "copy_ratio": float(copy_ratio),
      "fraction_replicated": float(replicated.size / ratio.size),
      "replicated": [int(i) for i in replicated],
  }


def source_ring_replication(candidates,
                            ring_masks,
                            tumor_slices,
                            source_index,
                            n_other: int = N_OTHER,
                            seed: int = 0,
                            chunk_q: int = 16) -> Dict[str, object]:
  """Source-ring replication from images (see `source_ring_summary`).

  Args:
    candidates: (Nc, ...) synthetic images.
    ring_masks: (Nc, ...) each candidate's ring mask.
    tumor_slices: (Nt, ...) the private tumor slices the sources come from.
    source_index: (Nc,) index of each candidate's source in tumor_slices.
  """
  src = np.asarray(source_index, np.int64).ravel()
  n_refs = int(np.asarray(tumor_slices).shape[0])
  others = other_indices(src, n_refs, n_other, seed)
  index = np.concatenate([src[:, None], others], axis=1)
  d = distances.distances_to(candidates, tumor_slices, index, ring_masks,
                             chunk_q=chunk_q)
  out = source_ring_summary(d[:, 0], d[:, 1:])
  out["n_other"] = int(others.shape[1])
  return out


def region_audit(candidates,
                 heldout,
                 train,
                 candidate_masks=None,
                 heldout_masks=None,
                 n: int = CARLINI_N,
                 alpha: float = CARLINI_ALPHA,
                 chunk_q: int = 32,
                 chunk_r: int = 64) -> Dict[str, object]:
  """DCR, NN ratio and Carlini's distance of one region, from images.

  Args:
    candidates: (Nc, ...) images to audit (synthetic set or a real split).
    heldout: (Nh, ...) held-out test slices of the same center (reference
      population for every threshold).
    train: (Nt, ...) the private training slices.
    candidate_masks, heldout_masks: each image's own region mask (None = full
      image); a mask is applied to both sides of each distance.
    n, alpha: Carlini's parameters (n is capped at the training set's size).
    chunk_q, chunk_r: `distances.nearest` block sizes.

  Returns:
    {"dcr": dcr_summary, "nn_ratio": nn_ratio_summary, "carlini":
     carlini_summary, "nearest_index": each candidate's nearest training
     index, "nearest_distance": its distance, "carlini_n": n used}.
  """
  n_train = int(np.asarray(train).shape[0])
  k = max(2, min(int(n), n_train))
  kw = dict(k=k, chunk_q=chunk_q, chunk_r=chunk_r)
  cd, ci = distances.nearest(candidates, train, candidate_masks, **kw)
  hd, _ = distances.nearest(heldout, train, heldout_masks, **kw)
  return {
      "dcr": dcr_summary(cd[:, 0], hd[:, 0]),
      "nn_ratio": nn_ratio_summary(cd[:, 0], cd[:, 1],
                                   heldout_d1=hd[:, 0], heldout_d2=hd[:, 1]),
      "carlini": carlini_summary(carlini_scores(cd, n, alpha),
                                 carlini_scores(hd, n, alpha)),
      "carlini_n": k,
      "nearest_index": [int(i) for i in ci[:, 0]],
      "nearest_distance": [float(x) for x in cd[:, 0]],
  }
