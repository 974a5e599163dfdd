"""The statistics of a membership attack, as a privacy reviewer reads them.

A score per slice (lower = "more likely trained on") is turned into numbers
that say how strong the attack is and how sure we are of it:

  roc_auc        P(member score < non-member score), ties 1/2.
  tpr_at         TPR at the threshold the non-members set for a target FPR,
                 with the false-positive rate reached, not the one asked for.
  evaluate       every number of one attack with patient-bootstrap intervals:
                 AUC, size-matched AUC, TPR at the reached FPR.
  size_baseline  tumor area itself used as the attack's score.
  interval       percentile interval of bootstrap values.

Why each piece:
- Slices of one patient are not independent (neighbouring slices of one
  tumor score alike), so the intervals resample PATIENTS, each side
  (members, non-members) on its own: a patient with many slices counts as
  one draw and widens the interval as it should. Seeded: the same scores
  give the same interval.
- With n non-members the smallest non-zero FPR is 1/n. The threshold is
  their (k+1)-th smallest score with k = floor(target_fpr * n); with 16
  non-members a 1 % target gives k = 0: no false positive at all, and the
  result says so (`false_positives`, `fpr`, `min_fpr`, `fpr_reachable`)
  instead of calling it TPR at 1 % FPR. `chance_tpr` = (k+1)/(n+1) is the
  TPR a score that cannot tell the two apart gets there on average.
- Members and non-members are different patients, and tumor size alone can
  separate them; a loss that depends on size then looks like membership.
  The size-matched AUC compares each member only with the non-members
  whose tumor area is within SIZE_CALIPER of its own (|log area ratio| <=
  SIZE_CALIPER), every such pair counting once; size_baseline says how far
  apart the two groups' sizes are.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from dfgm_jax import errors

LEVEL = 0.95
N_BOOT = 1000
# |log(area_member / area_nonmember)| <= 0.1: tumors within about 10 % of
# each other's area are compared. Narrower leaves fewer pairs, wider leaves
# more of a size difference inside the pairs.
SIZE_CALIPER = 0.1
# Bootstrap replicates per matrix product: a chunk holds _CHUNK x
# n_nonmembers partial sums, whatever n_boot.
_CHUNK = 100


def _scores_1d(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise errors.UserError(f"membership attack: no {name} scores")
  if not np.all(np.isfinite(values)):
    raise errors.UserError(f"membership attack: {name} scores are not all finite")
  return values


def _same_length(name: str, values, n: int) -> np.ndarray:
  values = np.asarray(values).ravel()
  if values.size != n:
    raise errors.UserError(f"membership attack: {values.size} {name} for {n} scores")
  return values


def roc_auc(member_scores, nonmember_scores) -> float:
  """P(member score < non-member score) + 1/2 P(equal): Mann-Whitney by ranks."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  m = _scores_1d("member", member_scores)
  h = _scores_1d("non-member", nonmember_scores)
  # Midranks (ties share their mean rank) of the negated scores: a lower
  # score ranks as a more likely member.
  ranks = stats.rankdata(-np.concatenate([m, h]), method="average")
  u = ranks[:m.size].sum() - m.size * (m.size + 1) / 2.0
  return float(u / (m.size * h.size))


def pair_wins(member_scores, nonmember_scores) -> np.ndarray:
  """(n_members, n_nonmembers): 1 where the member scores lower, 1/2 on ties."""
  m = np.asarray(member_scores, np.float64)[:, None]
  h = np.asarray(nonmember_scores, np.float64)[None, :]
  return (m < h) + 0.5 * (m == h)


def size_pairs(member_area, nonmember_area, caliper: float = SIZE_CALIPER) -> np.ndarray:
  """(n_members, n_nonmembers) bool: tumor areas within the caliper (log ratio)."""
  am = np.log(np.maximum(np.asarray(member_area, np.float64), 1.0))
  ah = np.log(np.maximum(np.asarray(nonmember_area, np.float64), 1.0))
  return np.abs(am[:, None] - ah[None, :]) <= caliper


def patient_weights(groups: Sequence, n_boot: int,
                    rng: np.random.Generator) -> np.ndarray:
  """(n_boot, n): how often each slice's patient is drawn in each replicate.

  Patients are drawn with replacement, as many as there are; a slice
  weighs as many times as its patient was drawn.
  """
  _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
  n_patients = int(index.max()) + 1
  counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients),
                           size=n_boot).astype(np.float64)
  return counts[:, index]


def weighted_auc(wins: np.ndarray, wm: np.ndarray, wh: np.ndarray,
                 pairs: np.ndarray | None = None) -> np.ndarray:
  """(B,) AUC of each weighting: sum wm_i wh_j wins_ij over sum wm_i wh_j,
  over the allowed pairs only; NaN where a weighting has no allowed pair."""
  wins = wins if pairs is None else wins * pairs
  allowed = np.ones_like(wins) if pairs is None else pairs.astype(np.float64)
  out = np.empty(len(wm))
  for start in range(0, len(wm), _CHUNK):
    a, b = wm[start:start + _CHUNK], wh[start:start + _CHUNK]
    num = np.einsum("bj,bj->b", a @ wins, b)
    den = np.einsum("bj,bj->b", a @ allowed, b)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[start:start + _CHUNK] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
  return out


def tpr_at(member_scores, nonmember_scores, target_fpr: float,
           wm: np.ndarray | None = None, wh: np.ndarray | None = None) -> dict:
  """TPR of `score < threshold`, the threshold set on the non-members alone.

  With weights (a bootstrap replicate) a slice counts as many times as its
  weight. The threshold is the (k+1)-th smallest non-member score, k =
  floor(target_fpr * n), n their total weight: at most k non-members fall
  strictly below it (fewer with ties).

  Returns:
    tpr, fpr (reached), false_positives (weighted count below), k, threshold.
  """
  m = np.asarray(member_scores, np.float64)
  h = np.asarray(nonmember_scores, np.float64)
  wm = np.ones_like(m) if wm is None else np.asarray(wm, np.float64)
  wh = np.ones_like(h) if wh is None else np.asarray(wh, np.float64)
  keep = wh > 0
  h, wh = h[keep], wh[keep]
  order = np.argsort(h, kind="stable")
  h, wh = h[order], wh[order]
  n = wh.sum()
  k = int(np.floor(target_fpr * n + 1e-9))
  # The first score whose cumulative weight passes k: the (k+1)-th smallest.
  at = min(int(np.searchsorted(np.cumsum(wh), k, side="right")), h.size - 1)
  threshold = float(h[at])
  false_pos = float(wh[h < threshold].sum())
  return {"tpr": float(wm[m < threshold].sum() / wm.sum()), "fpr": false_pos / n,
          "false_positives": false_pos, "k": k, "threshold": threshold}


def interval(values, level: float = LEVEL) -> list | None:
  """[lo, hi]: the percentile interval of bootstrap values (NaNs dropped);
  None when none is finite."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return None
  tail = 50.0 * (1.0 - level)
  return [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))]


def _check(target_fpr: float, level: float, n_boot: int) -> None:
  if not 0.0 <= target_fpr < 1.0:
    raise errors.UserError(f"membership attack: target_fpr={target_fpr} not in [0, 1)")
  if not 0.0 < level < 1.0:
    raise errors.UserError(f"membership attack: level={level} not in (0, 1)")
  if int(n_boot) < 1:
    raise errors.UserError(f"membership attack: n_boot={n_boot}: must be >= 1")


def evaluate(member_scores, nonmember_scores, *, member_groups, nonmember_groups,
             member_area=None, nonmember_area=None, target_fpr: float = 0.01,
             n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
             caliper: float = SIZE_CALIPER) -> Dict:
  """One attack's numbers with patient-bootstrap intervals.

  Args:
    member_scores, nonmember_scores: (n,) scores, lower = member.
    member_groups, nonmember_groups: each slice's patient (case id).
    member_area, nonmember_area: tumor areas in pixels; None: no size-matched AUC.
    target_fpr: the FPR asked for; the reached one is reported.
    n_boot, seed, level: the bootstrap.
    caliper: size matching (see the module docstring).

  Returns (JSON-serialisable):
    auc, auc_interval; matched_auc, matched_auc_interval, matched_pairs,
    matched_members (fraction of members with at least one size-matched
    non-member), matched_member_patients, matched_nonmember_patients
    (patients with a slice in some pair), caliper (when areas are given;
    matched_auc None without any pair); tpr_at_fpr, tpr_interval, fpr (reached), false_positives,
    target_fpr, min_fpr (1/n), fpr_reachable (min_fpr <= target_fpr),
    chance_tpr, threshold; medians, counts of slices and patients,
    n_boot, level.
  """
  _check(target_fpr, level, n_boot)
  m = _scores_1d("member", member_scores)
  h = _scores_1d("non-member", nonmember_scores)
  gm = _same_length("member patients", member_groups, m.size)
  gh = _same_length("non-member patients", nonmember_groups, h.size)
  rng = np.random.default_rng(seed)
  wm = patient_weights(gm, n_boot, rng)
  wh = patient_weights(gh, n_boot, rng)
  wins = pair_wins(m, h)
  point = tpr_at(m, h, target_fpr)
  boot_tpr = [tpr_at(m, h, target_fpr, a, b)["tpr"] for a, b in zip(wm, wh)]
  n_h = h.size
  out = {
      "auc": roc_auc(m, h),
      "auc_interval": interval(weighted_auc(wins, wm, wh), level),
      "tpr_at_fpr": point["tpr"],
      "tpr_interval": interval(boot_tpr, level),
      "fpr": point["fpr"],
      "false_positives": int(round(point["false_positives"])),
      "target_fpr": float(target_fpr),
      "min_fpr": 1.0 / n_h,
      "fpr_reachable": bool(1.0 / n_h <= target_fpr),
      "chance_tpr": (point["k"] + 1) / (n_h + 1),
      "threshold": point["threshold"],
      "member_median": float(np.median(m)),
      "nonmember_median": float(np.median(h)),
      "n_members": int(m.size),
      "n_nonmembers": int(n_h),
      "n_member_patients": int(len(set(map(str, gm)))),
      "n_nonmember_patients": int(len(set(map(str, gh)))),
      "n_boot": int(n_boot),
      "level": float(level),
  }
  if member_area is not None and nonmember_area is not None:
    pairs = size_pairs(_same_length("member areas", member_area, m.size),
                       _same_length("non-member areas", nonmember_area, n_h), caliper)
    ones_m, ones_h = np.ones((1, m.size)), np.ones((1, n_h))
    matched = weighted_auc(wins, ones_m, ones_h, pairs)[0]
    out.update({
        "matched_auc": None if np.isnan(matched) else float(matched),
        "matched_auc_interval": interval(weighted_auc(wins, wm, wh, pairs), level),
        "matched_pairs": int(pairs.sum()),
        "matched_members": float(pairs.any(axis=1).mean()),
        # Patients in at least one pair: how many independent units the
        # size-matched AUC rests on.
        "matched_member_patients": int(len(set(map(str, gm[pairs.any(axis=1)])))),
        "matched_nonmember_patients": int(len(set(map(str, gh[pairs.any(axis=0)])))),
        "caliper": float(caliper),
    })
  return out


def size_baseline(member_area, nonmember_area, *, member_groups, nonmember_groups,
                  n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Dict:
  """Tumor area used as the attack's score (smaller area = "member").

  0.5: the two groups' tumors are alike in size; away from 0.5 either way,
  size alone tells them apart and an unmatched AUC mixes size with
  membership.
  """
  _check(0.0, level, n_boot)
  am = _scores_1d("member area", member_area)
  ah = _scores_1d("non-member area", nonmember_area)
  rng = np.random.default_rng(seed)
  wm = patient_weights(_same_length("member patients", member_groups, am.size), n_boot, rng)
  wh = patient_weights(_same_length("non-member patients", nonmember_groups, ah.size),
                       n_boot, rng)
  return {"auc": roc_auc(am, ah),
          "auc_interval": interval(weighted_auc(pair_wins(am, ah), wm, wh), level),
          "member_median_area": float(np.median(am)),
          "nonmember_median_area": float(np.median(ah))}
