"""Memorization metrics of the privacy audit (ALGORITHM.md section 9, 1-4).

Every metric compares candidates (synthetic images, or any real split) with
the private training set, and takes its threshold from the same center's
held-out test slices measured against the same training set: a held-out
slice is a real image the model never saw, so "closer to the training set
than held-out slices are" is the warning sign. Distances are aligned
(`distances.nearest_aligned`: the minimum over small shifts, flips and
quarter turns), so a copy moved by a pixel or mirrored is still at about 0.

Held-out slices come in patients, and two slices of one patient are not two
independent draws: every threshold is a quantile of the held-out values with
an interval from resampling held-out PATIENTS (`threshold_interval`).
Candidates come in groups too (a real split's patients, a synthetic set's
source patients): the fraction of candidates below the threshold gets its
interval from resampling both at once, held-out patients and candidate
groups. A check warns only when that fraction is beyond chance: a
permutation test that deals the held-out patients and the candidate groups
anew between the two sides (were the candidates unseen real patients, any
deal would be as likely) gives p < 1 - `CONFIDENCE`. With fewer held-out
patients than `MIN_HELDOUT_PATIENTS` no interval is trusted and the
calibrated checks say "reference too small" instead of guessing.

Near copies (`copy_summary`) need no calibration but a yardstick: a
candidate is a copy when its aligned distance is 0, when it is far nearer
one training image than any held-out slice is to its nearest (below
`COPY_MARGIN` of the held-out minimum), or under the NN-ratio rule
rho < 1/3 of Gu et al. 2023, which is a ratio, not a distance.

  threshold_interval         held-out quantile with a patient-bootstrap interval.
  dcr_summary                distance to closest record vs held-out slices.
  nn_ratio_summary           d1/d2, copies flagged at rho < 1/3.
  copy_summary               exact and near copies, by rule.
  carlini_scores/_summary    Carlini et al. 2023 calibrated distance.
  other_indices              50 other tumor slices per candidate (seeded).
  source_ring_summary        ring distance to own source vs to other slices.
  region_audit               all of the above for one region, from images.

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
# Calibration: thresholds are the held-out 5th percentile (stabler than the
# 1st with tens of held-out slices) with a 95 % interval from resampling the
# held-out patients; fewer than 5 patients cannot give an interval.
# N_BOOTSTRAP is the number of draws of each resampling (the bootstrap and
# the permutation test alike).
HELDOUT_QUANTILE = 0.05
N_BOOTSTRAP = 1000
INTERVAL = 0.95
MIN_HELDOUT_PATIENTS = 5
# A check warns when the candidates' fraction below the threshold is above
# HELDOUT_QUANTILE with permutation p < 1 - CONFIDENCE. Two such checks run
# per region; tests/test_copy_checks.py measures how often clean patients
# still come out "ok" in every region.
CONFIDENCE = 0.99
# Near copy: aligned distance below half the smallest held-out one.
COPY_MARGIN = 0.5


def _q(values: np.ndarray, pct: float) -> float:
  return float(np.percentile(values, pct))


def _nonempty(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise errors.UserError(f"{name}: no values (empty set)")
  return values


def _units(patients, n: int, what: str = "held-out patients") -> np.ndarray:
  """(n,) integer patient labels; None = every value its own patient."""
  if patients is None:
    return np.arange(n)
  patients = np.asarray(patients).ravel()
  if patients.size != n:
    raise errors.UserError(f"{what}: {patients.size} labels for {n} values")
  return np.unique(patients, return_inverse=True)[1].ravel()


def _weighted_quantiles(values, units, counts, quantile) -> np.ndarray:
  """The quantile of each row's multiset: unit u's values taken counts[b, u]
  times (numpy's linear interpolation of the repeated, sorted array).

  values, units: (n,); counts: (B, n_units) non-negative integers.
  """
  order = np.argsort(values, kind="stable")
  v, u = values[order], units[order]
  cum = np.cumsum(counts[:, u], axis=1)
  pos = quantile * (cum[:, -1] - 1)
  lo = np.floor(pos)
  # The repeated array's j-th value is v[i], i = how many cum entries are <= j.
  i_lo = np.minimum((cum <= lo[:, None]).sum(1), v.size - 1)
  i_hi = np.minimum((cum <= lo[:, None] + 1).sum(1), v.size - 1)
  return v[i_lo] + (pos - lo) * (v[i_hi] - v[i_lo])


def _draw_quantiles(values, units, quantile, n_bootstrap, rng) -> np.ndarray:
  """The quantile of `n_bootstrap` resamples of whole units (patients)."""
  n_units = int(units.max()) + 1
  picks = rng.integers(0, n_units, (int(n_bootstrap), n_units))
  counts = np.stack([np.bincount(p, minlength=n_units) for p in picks])
  return _weighted_quantiles(values, units, counts, quantile)


def _check_calibration(quantile, interval, n_bootstrap, confidence=0.5):
  if (not 0.0 < quantile < 1.0 or not 0.0 < interval < 1.0 or n_bootstrap < 1
      or not 0.0 < confidence < 1.0):
    raise errors.ConfigError(f"calibration: quantile={quantile}, interval={interval} and "
                             f"confidence={confidence} must be in (0, 1), n_bootstrap="
                             f"{n_bootstrap} >= 1")


def threshold_interval(values, patients=None, quantile: float = HELDOUT_QUANTILE,
                       n_bootstrap: int = N_BOOTSTRAP, interval: float = INTERVAL,
                       seed: int = 0) -> Dict[str, float]:
  """A held-out quantile and its interval from resampling patients.

  Each bootstrap draw takes as many held-out patients as there are, with
  replacement, and all their slices; the interval is the central `interval`
  of the draws' quantiles. Patients, not slices, are resampled: slices of
  one patient are alike, and the threshold must hold for the next patient.

  Returns:
    threshold (the quantile of all values), low, high, quantile,
    n_patients.
  """
  v = _nonempty("held-out values", values)
  _check_calibration(quantile, interval, n_bootstrap)
  units = _units(patients, v.size)
  draws = _draw_quantiles(v, units, quantile, n_bootstrap, np.random.default_rng(seed))
  tail = 100 * (1 - interval) / 2
  return {"threshold": float(np.quantile(v, quantile)), "low": _q(draws, tail),
          "high": _q(draws, 100 - tail), "quantile": float(quantile),
          "n_patients": int(units.max()) + 1}


def _permutation_p(observed, h, h_units, c, c_units, quantile, n_perm, rng) -> float:
  """p of the candidates' fraction below the held-out quantile, dealing the
  held-out patients and candidate groups anew between the two sides."""
  n_h = int(h_units.max()) + 1
  n_groups = n_h + int(c_units.max()) + 1
  values = np.concatenate([h, c])
  units = np.concatenate([h_units, n_h + c_units])
  # held[b, g]: group g is on the held-out side in deal b.
  held = np.stack([rng.permutation(n_groups) < n_h for _ in range(int(n_perm))])
  t = _weighted_quantiles(values, units, held.astype(np.int64), quantile)
  rest = ~held[:, units]
  fractions = (rest & (values[None] < t[:, None])).sum(1) / rest.sum(1)
  return float((1 + np.sum(fractions >= observed)) / (1 + int(n_perm)))


def _calibrated(name: str, candidate, heldout, patients, groups, quantile, n_bootstrap,
                confidence, seed, min_patients) -> Dict[str, object]:
  """Candidates below the held-out threshold, and whether that is more than
  chance (see `dcr_summary`)."""
  c = _nonempty(f"{name} candidates", candidate)
  h = _nonempty(f"{name} held-out", heldout)
  _check_calibration(quantile, INTERVAL, n_bootstrap, confidence)
  h_units = _units(patients, h.size)
  c_units = _units(groups, c.size, "candidate groups")
  rng = np.random.default_rng(seed)
  thresholds = _draw_quantiles(h, h_units, quantile, n_bootstrap, rng)
  # The same draws for the candidates' fraction: resampled candidate groups
  # against each draw's threshold.
  n_groups = int(c_units.max()) + 1
  # counts[u, b]: candidates of group u under draw b's threshold.
  counts = np.stack([np.searchsorted(np.sort(c[c_units == u]), thresholds)
                     for u in range(n_groups)])
  sizes = np.bincount(c_units, minlength=n_groups)
  pick = rng.integers(0, n_groups, (thresholds.size, n_groups))
  fractions = (counts[pick, np.arange(thresholds.size)[:, None]].sum(1)
               / sizes[pick].sum(1))
  threshold = float(np.quantile(h, quantile))
  below = np.flatnonzero(c < threshold)
  tail = 100 * (1 - INTERVAL) / 2
  p_value = _permutation_p(below.size / c.size, h, h_units, c, c_units, quantile,
                           n_bootstrap, rng)
  too_small = int(h_units.max()) + 1 < min_patients
  return {
      "threshold": threshold, "threshold_low": _q(thresholds, tail),
      "threshold_high": _q(thresholds, 100 - tail), "quantile": float(quantile),
      "heldout_patients": int(h_units.max()) + 1, "candidate_groups": n_groups,
      "fraction_below": float(below.size / c.size), "n_below": int(below.size),
      "below": [int(i) for i in below],
      "fraction_below_interval": [_q(fractions, tail), _q(fractions, 100 - tail)],
      "p_value": p_value, "confidence": float(confidence),
      # Only a reference with enough patients can say "more than chance".
      "exceeds": bool(not too_small and below.size / c.size > quantile
                      and p_value < 1 - confidence),
      "reference_too_small": bool(too_small),
  }


def dcr_summary(candidate_d1, heldout_d1, heldout_patients=None, candidate_groups=None,
                quantile: float = HELDOUT_QUANTILE, n_bootstrap: int = N_BOOTSTRAP,
                confidence: float = CONFIDENCE, seed: int = 0,
                min_patients: int = MIN_HELDOUT_PATIENTS) -> Dict[str, object]:
  """Distance to closest record (DCR) of candidates against held-out slices.

  Args:
    candidate_d1: (Nc,) each candidate's distance to its nearest training image.
    heldout_d1: (Nh,) the same for held-out test slices of the same center.
    heldout_patients: (Nh,) each held-out slice's patient (None: every slice
      its own patient).
    candidate_groups: (Nc,) each candidate's patient or source patient
      (None: every candidate its own group).
    quantile, n_bootstrap, confidence, seed, min_patients: the calibration
      (module constants).

  Returns:
    candidate_median, candidate_p5, heldout_median, heldout_p5, heldout_min.
    threshold: the held-out `quantile`; threshold_low, threshold_high: its
      interval over resampled held-out patients.
    fraction_below, n_below, below: candidates under the threshold; clean
      candidates give about `quantile`. fraction_below_interval: its
      interval over resampled held-out patients and candidate groups;
      p_value: the permutation test's (held-out patients and candidate
      groups dealt anew between the sides). exceeds: the fraction is above
      `quantile` with p_value < 1 - confidence, i.e. more candidates sit
      close to a training image than unseen slices do, beyond chance; never
      with fewer than min_patients held-out patients (reference_too_small).
    fraction_zero: fraction of candidates at DCR 0 (exact copies).
    n_candidates, n_heldout.
  """
  c = _nonempty("dcr candidates", candidate_d1)
  h = _nonempty("dcr held-out", heldout_d1)
  out = _calibrated("dcr", c, h, heldout_patients, candidate_groups, quantile,
                    n_bootstrap, confidence, seed, min_patients)
  out.update({
      "candidate_median": _q(c, 50),
      "candidate_p5": _q(c, 5),
      "heldout_median": _q(h, 50),
      "heldout_p5": _q(h, 5),
      "heldout_min": float(h.min()),
      "fraction_zero": float(np.mean(c == 0)),
      "n_candidates": int(c.size),
      "n_heldout": int(h.size),
  })
  return out


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


def copy_summary(d1, d2, heldout_d1, heldout_d2=None,
                 copy_margin: float = COPY_MARGIN,
                 copy_ratio: float = COPY_RATIO,
                 use_margin: bool = True) -> Dict[str, object]:
  """Exact and near copies of training images among the candidates.

  A candidate is a copy when any of:
    exact: its (aligned) distance to a training image is 0;
    margin: it is nearer a training image than copy_margin times the
      smallest held-out distance (no unseen slice came that close; off when
      use_margin is False, i.e. the held-out reference is too small to trust
      its minimum);
    ratio: d1/d2 < copy_ratio (much nearer one training image than the next).

  Returns:
    n, fraction, copies (indices): candidates that are copies by any rule.
    n_exact, n_margin, n_ratio: by each rule (a candidate may meet several).
    copy_distance: copy_margin x the held-out minimum (None when unused).
    heldout_ratio_flagged: held-out slices under the ratio rule (0 expected;
      more says the rule is loose on this data).
  """
  d1 = _nonempty("copies d1", d1)
  d2 = _nonempty("copies d2", d2)
  h1 = _nonempty("copies held-out d1", heldout_d1)
  if not 0.0 < copy_margin < 1.0:
    raise errors.ConfigError(f"copy_margin={copy_margin}: must be in (0, 1)")
  exact = d1 == 0
  copy_distance = copy_margin * float(h1.min()) if use_margin else None
  margin = d1 < copy_distance if use_margin else np.zeros_like(exact)
  ratio = nn_ratios(d1, d2) < copy_ratio
  copies = np.flatnonzero(exact | margin | ratio)
  out = {
      "n": int(copies.size), "fraction": float(copies.size / d1.size),
      "copies": [int(i) for i in copies], "n_exact": int(exact.sum()),
      "n_margin": int(margin.sum()), "n_ratio": int(ratio.sum()),
      "copy_distance": copy_distance, "copy_margin": float(copy_margin),
      "copy_ratio": float(copy_ratio),
  }
  if heldout_d2 is not None:
    out["heldout_ratio_flagged"] = float(np.mean(nn_ratios(h1, heldout_d2) < copy_ratio))
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


def carlini_summary(candidate_scores, heldout_scores, heldout_patients=None,
                    candidate_groups=None, n_smallest: int = 16, quantile: float = HELDOUT_QUANTILE,
                    n_bootstrap: int = N_BOOTSTRAP, confidence: float = CONFIDENCE,
                    seed: int = 0,
                    min_patients: int = MIN_HELDOUT_PATIENTS) -> Dict[str, object]:
  """Carlini scores of candidates against the held-out calibration.

  Returns:
    threshold, threshold_low, threshold_high, fraction_below, n_below, below,
      fraction_below_interval, p_value, exceeds,
      reference_too_small: as `dcr_summary`,
      on the score instead of the distance.
    median, p5, heldout_median: the distributions.
    smallest: the n_smallest candidates as [index, score], lowest first
      (the ones to look at in the figure).
  """
  c = _nonempty("carlini candidates", candidate_scores)
  h = _nonempty("carlini held-out", heldout_scores)
  out = _calibrated("carlini", c, h, heldout_patients, candidate_groups, quantile,
                    n_bootstrap, confidence, seed, min_patients)
  order = np.argsort(c, kind="stable")[:n_smallest]
  out.update({
      "median": _q(c, 50),
      "p5": _q(c, 5),
      "heldout_median": _q(h, 50),
      "smallest": [[int(i), float(c[i])] for i in order],
  })
  return out


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
                 heldout_patients=None,
                 candidate_groups=None,
                 n: int = CARLINI_N,
                 alpha: float = CARLINI_ALPHA,
                 max_shift: int = 2,
                 flips: bool = True,
                 rotations: bool = True,
                 quantile: float = HELDOUT_QUANTILE,
                 n_bootstrap: int = N_BOOTSTRAP,
                 confidence: float = CONFIDENCE,
                 copy_margin: float = COPY_MARGIN,
                 min_patients: int = MIN_HELDOUT_PATIENTS,
                 seed: int = 0,
                 chunk_q: int = 32,
                 chunk_r: int = 64) -> Dict[str, object]:
  """DCR, NN ratio, copies and Carlini's distance of one region, from images.

  Args:
    candidates: (Nc, H, W[, C]) images to audit (synthetic set or a real split).
    heldout: (Nh, ...) held-out test slices of the same center (reference
      population for every threshold).
    train: (Nt, ...) the private training slices.
    candidate_masks, heldout_masks: each image's own region mask (None = full
      image); it moves with its image under the alignment transforms.
    heldout_patients: (Nh,) the held-out slices' patients (case ids); None:
      every slice counted as its own patient.
    candidate_groups: (Nc,) the candidates' patients (a real split's case
      ids, a synthetic set's source pseudonyms); None: each its own.
    n, alpha: Carlini's parameters (n is capped at the training set's size).
    max_shift, flips, rotations: the aligned distance's transforms
      (`distances.nearest_aligned`).
    quantile, n_bootstrap, confidence, copy_margin, min_patients, seed: the
      calibration (module constants).
    chunk_q, chunk_r: block sizes on device.

  Returns:
    {"dcr", "nn_ratio", "copies", "carlini": the summaries, "reference":
     {n_heldout, n_patients, min_patients, too_small}, "nearest_index",
     "nearest_distance", "nearest_transform" (words) per candidate,
     "carlini_n": n used}.
  """
  train = np.asarray(train)
  n_train = int(train.shape[0])
  k = max(2, min(int(n), n_train))
  kw = dict(k=k, max_shift=max_shift, flips=flips, rotations=rotations,
            chunk_q=chunk_q, chunk_r=chunk_r)
  cd, ci, ct = distances.nearest_aligned(candidates, train, candidate_masks, **kw)
  hd, _, _ = distances.nearest_aligned(heldout, train, heldout_masks, **kw)
  cal = dict(quantile=quantile, n_bootstrap=n_bootstrap, confidence=confidence,
             seed=seed, min_patients=min_patients)
  dcr = dcr_summary(cd[:, 0], hd[:, 0], heldout_patients, candidate_groups, **cal)
  n_patients = dcr["heldout_patients"]
  too_small = n_patients < min_patients
  names = distances.transform_names(train.shape[1], train.shape[2], max_shift, flips,
                                    rotations)
  return {
      "dcr": dcr,
      "nn_ratio": nn_ratio_summary(cd[:, 0], cd[:, 1],
                                   heldout_d1=hd[:, 0], heldout_d2=hd[:, 1]),
      "copies": copy_summary(cd[:, 0], cd[:, 1], hd[:, 0], hd[:, 1], copy_margin,
                             use_margin=not too_small),
      "carlini": carlini_summary(carlini_scores(cd, n, alpha),
                                 carlini_scores(hd, n, alpha), heldout_patients,
                                 candidate_groups, **cal),
      "reference": {"n_heldout": int(hd.shape[0]), "n_patients": int(n_patients),
                    "min_patients": int(min_patients), "too_small": bool(too_small)},
      "carlini_n": k,
      "nearest_index": [int(i) for i in ci[:, 0]],
      "nearest_distance": [float(x) for x in cd[:, 0]],
      "nearest_transform": [names[t] for t in ct[:, 0]],
  }
