"""Segmentation metrics on 2D slices: Dice, HD95, pooled and per-patient Dice.

Conventions (shared/docs/BRATS_FORMAT.md 4, ALGORITHM.md 7):
- Prediction: `sigmoid(logit) > 0.5`, i.e. `logit > 0` (or `prob > 0.5`).
- Dice per slice = 2|A and B| / (|A| + |B|); both empty = 1, one empty = 0
  (BraTS / nnU-Net `compute_BraTS_dice`).
- HD95 per slice = the larger of the two directed 95th percentiles of the
  border-to-border distances, in mm (DeepMind surface-distance, MONAI
  `compute_hausdorff_distance(percentile=95)`, the BraTS 2023 metrics). medpy
  pools both directions before taking the percentile, which gives other values
  (4.5962 instead of 19.1050 on the case pinned in tests). Both empty = 0;
  exactly one empty = the image diagonal in mm (339.41 at 240 x 240, 1 mm).
- Spacing: 240 mm / image size unless given (the preprocessed slices are the
  240 x 240 x 1 mm BraTS grid, possibly resized).
- Borders: `m ^ binary_erosion(m, 4-connected cross, border_value=0)`; the
  distance from a border pixel of one mask to the other mask's border comes
  from a Euclidean distance transform (scipy), as MONAI does.

The primary metric is the mean per-slice Dice over the test slices; pooled
(micro) Dice, per-patient Dice and HD95 are secondary. `relative_gain_ci` gives
the paper's relative gain (after - before) / before with a paired bootstrap
interval over test patients and seeds. Everything is numpy in, numpy out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

IMAGE_EXTENT_MM = 240.0  # the BraTS in-plane field of view (240 voxels of 1 mm)
_CROSS = ndimage.generate_binary_structure(2, 1)


def _as_masks(x, name: str) -> np.ndarray:
  """(B,H,W) or (B,H,W,1) -> bool (B,H,W)."""
  x = np.asarray(x)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3:
    raise ValueError(f"{name}: expected binary masks (B, H, W), got shape {x.shape}")
  return x.astype(bool)


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
  pred, ref = _as_masks(pred, "pred"), _as_masks(ref, "ref")
  if pred.shape != ref.shape:
    raise ValueError(f"pred {pred.shape} and ref {ref.shape} differ in shape")
  return pred, ref


def _dice_from_counts(inter, size_sum) -> np.ndarray:
  """2 * inter / size_sum, 1 where both sets are empty (size_sum == 0)."""
  inter = np.asarray(inter, np.float64)
  size_sum = np.asarray(size_sum, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(size_sum > 0, 2.0 * inter / np.maximum(size_sum, 1), 1.0)


def dice(pred, ref) -> np.ndarray:
  """Dice per slice of binary masks (B,H,W): float64 (B,); both empty = 1."""
  pred, ref = _pair(pred, ref)
  inter = np.sum(pred & ref, axis=(1, 2))
  return _dice_from_counts(inter, pred.sum(axis=(1, 2)) + ref.sum(axis=(1, 2)))


def pooled_dice(pred, ref) -> float:
  """Micro Dice: one Dice over all pixels of all slices (both empty = 1)."""
  pred, ref = _pair(pred, ref)
  return float(_dice_from_counts(np.sum(pred & ref), pred.sum() + ref.sum()))


def _spacing(spacing_mm, shape: tuple[int, int]) -> tuple[float, float]:
  if spacing_mm is None:
    return IMAGE_EXTENT_MM / shape[0], IMAGE_EXTENT_MM / shape[1]
  s = np.broadcast_to(np.asarray(spacing_mm, np.float64), (2,))
  if np.any(s <= 0):
    raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
  return float(s[0]), float(s[1])


def _border(mask: np.ndarray) -> np.ndarray:
  return mask ^ ndimage.binary_erosion(mask, _CROSS, border_value=0)


def _directed_percentile(from_border, to_border, spacing, q: float) -> float:
  # Distance of every pixel to the nearest border pixel of `to`, read on `from`'s border.
  dist = ndimage.distance_transform_edt(~to_border, sampling=spacing)
  return float(np.percentile(dist[from_border], q))


def hd95(pred, ref, spacing_mm=None, percentile: float = 95.0) -> np.ndarray:
  """95th-percentile Hausdorff distance per slice in mm, float64 (B,).

  Args:
    pred: binary masks (B,H,W) (or (B,H,W,1)).
    ref: reference masks, same shape.
    spacing_mm: pixel size in mm, a scalar or (row, col); default 240 mm /
      image size per axis.
    percentile: 95 for HD95 (100 gives the Hausdorff distance).

  Returns:
    max(P95 of d(pred border -> ref border), P95 of d(ref border -> pred
    border)) per slice; 0 when both masks are empty, the image diagonal in mm
    when exactly one is.
  """
  pred, ref = _pair(pred, ref)
  sy, sx = _spacing(spacing_mm, pred.shape[1:])
  diagonal = float(np.hypot(pred.shape[1] * sy, pred.shape[2] * sx))
  out = np.empty(pred.shape[0], np.float64)
  for i, (p, r) in enumerate(zip(pred, ref)):
    p_any, r_any = p.any(), r.any()
    if not p_any and not r_any:
      out[i] = 0.0
    elif not p_any or not r_any:
      out[i] = diagonal
    else:
      bp, br = _border(p), _border(r)
      out[i] = max(_directed_percentile(bp, br, (sy, sx), percentile),
                   _directed_percentile(br, bp, (sy, sx), percentile))
  return out


def per_patient_dice(pred, ref, patient_ids: Sequence) -> dict:
  """Dice per patient: the Dice of all the patient's voxels pooled over its slices.

  A patient's Dice is 2 sum|A and B| / (sum|A| + sum|B|) over the slices that
  carry its key (a per-volume Dice restricted to the selected slices), not the
  mean of its per-slice Dice; 1 when the patient has no tumor voxels in either.

  Returns:
    {patient_id: dice}, keys in sorted order.
  """
  pred, ref = _pair(pred, ref)
  keys, inverse = _group(patient_ids, pred.shape[0])
  inter = np.bincount(inverse, np.sum(pred & ref, axis=(1, 2)), len(keys))
  sizes = np.bincount(inverse, pred.sum(axis=(1, 2)) + ref.sum(axis=(1, 2)), len(keys))
  values = _dice_from_counts(inter, sizes)
  return {_plain(k): float(v) for k, v in zip(keys, values)}


def _plain(key):
  """numpy scalar -> Python scalar, so keys serialise to JSON."""
  return key.item() if isinstance(key, np.generic) else key


def _group(patient_ids: Sequence, n: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.asarray(patient_ids)
  if ids.shape != (n,):
    raise ValueError(f"patient_ids: expected {n} keys (one per slice), got shape {ids.shape}")
  return np.unique(ids, return_inverse=True)


def relative_gain_ci(before, after, patient_ids: Sequence, n_boot: int = 2000,
                     seed: int = 0, alpha: float = 0.05) -> dict:
  """Relative gain of the mean per-slice Dice with a paired hierarchical bootstrap.

  gain = (mean(after) - mean(before)) / mean(before), as the paper reports it
  (0.51 -> 0.53 is +3.9 %). Each resample draws test patients with
  replacement (all slices of a drawn patient, so that a patient's
  correlated slices move together) and, with seeds, the seeds with
  replacement, and takes the gain of the mean per-slice Dice over the drawn
  seeds and slices. It is paired: before and after use the same patients
  and the same seeds (seed i of the after run with seed i of the before
  run). Averaging the seeds first would hide their variance (the demo's
  seeds gaining +0.07 % and +20.4 % read [+9.2 %, +9.4 %]); drawing them
  widens the interval by what another choice of seeds could give.

  Args:
    before: per-slice Dice without augmentation, (N,) or (n_seeds, N).
    after: per-slice Dice with augmentation, same shape and slice order.
    patient_ids: (N,) patient key of each test slice.
    n_boot: bootstrap resamples.
    seed: numpy RNG seed of the resampling.
    alpha: 1 - confidence level (0.05: a 95 % interval).

  Returns:
    dict with `gain` (point estimate on all slices and seeds), `low`, `high`
    (the alpha/2 and 1 - alpha/2 percentiles of the bootstrap gains),
    `before`, `after` (the two means), `n_patients`, `n_slices`, `n_seeds`,
    `n_boot`, `alpha`.
  """
  boot = _paired_bootstrap(before, after, patient_ids, n_boot, seed, alpha)

  def gain(mb, ma):
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(mb > 0, (ma - mb) / np.where(mb > 0, mb, 1.0), np.nan)

  low, high = np.nanpercentile(gain(boot["mean_b"], boot["mean_a"]),
                               [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return {"gain": float(gain(boot["before"], boot["after"])), "low": float(low),
          "high": float(high), **boot["info"]}


def difference_ci(before, after, patient_ids: Sequence, n_boot: int = 2000,
                  seed: int = 0, alpha: float = 0.05) -> dict:
  """Difference of means, after - before, with relative_gain_ci's paired
  hierarchical bootstrap (patients and seeds together).

  For measures whose 'before' may be 0, e.g. the false-positive area on
  tumor-free slices. Same arguments as relative_gain_ci.

  Returns:
    dict with `difference` (point estimate), `low`, `high`, `before`,
    `after`, `n_patients`, `n_slices`, `n_seeds`, `n_boot`, `alpha`.
  """
  boot = _paired_bootstrap(before, after, patient_ids, n_boot, seed, alpha)
  low, high = np.percentile(boot["mean_a"] - boot["mean_b"],
                            [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return {"difference": float(boot["after"] - boot["before"]), "low": float(low),
          "high": float(high), **boot["info"]}


def _paired_bootstrap(before, after, patient_ids: Sequence, n_boot: int, seed: int,
                      alpha: float) -> dict:
  """The resampled means of relative_gain_ci and difference_ci.

  Returns:
    mean_b, mean_a ((n_boot,) means over the drawn seeds and slices),
    before, after (the means over all), info (the counts and settings).
  """
  before = np.asarray(before, np.float64)
  after = np.asarray(after, np.float64)
  if before.shape != after.shape or before.ndim not in (1, 2):
    raise ValueError(f"before {before.shape} and after {after.shape} must be equal "
                     "shapes (N,) or (n_seeds, N)")
  if before.ndim == 1:
    before, after = before[None], after[None]
  n_seeds, n = before.shape
  if n == 0 or n_seeds == 0:
    raise ValueError("paired bootstrap: no test slices")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  keys, inverse = _group(patient_ids, n)
  p = len(keys)
  # Per seed and patient: the sums of the per-slice values, (n_seeds, p).
  sum_b = np.stack([np.bincount(inverse, b, p) for b in before])
  sum_a = np.stack([np.bincount(inverse, a, p) for a in after])
  count = np.bincount(inverse, minlength=p).astype(np.float64)
  rng = np.random.default_rng(seed)
  # How often each patient (n_boot, p) and each seed (n_boot, n_seeds) is
  # drawn in each resample. One seed: always drawn, the patients alone
  # vary (the same draws as before seeds were resampled).
  patients = _draw_counts(rng, n_boot, p)
  seeds = (_draw_counts(rng, n_boot, n_seeds) if n_seeds > 1
           else np.ones((n_boot, 1), np.float64))
  slices = (patients @ count) * seeds.sum(axis=1)
  return {"mean_b": np.einsum("rs,sp,rp->r", seeds, sum_b, patients) / slices,
          "mean_a": np.einsum("rs,sp,rp->r", seeds, sum_a, patients) / slices,
          "before": float(before.mean()), "after": float(after.mean()),
          "info": {"before": float(before.mean()), "after": float(after.mean()),
                   "n_patients": int(p), "n_slices": int(n), "n_seeds": int(n_seeds),
                   "n_boot": int(n_boot), "alpha": float(alpha)}}


def _draw_counts(rng, n_boot: int, k: int) -> np.ndarray:
  """(n_boot, k): how often each of k items is drawn in n_boot resamples of k."""
  draws = rng.integers(0, k, size=(n_boot, k))
  times = np.zeros((n_boot, k), np.float64)
  np.add.at(times, (np.repeat(np.arange(n_boot), k), draws.ravel()), 1.0)
  return times


class SegmentationEvaluator:
  """Accumulates test batches and yields named metrics (big_vision style).

    ev = SegmentationEvaluator()
    for batch in test:
      ev.update(logits, batch["mask"], batch["patient"])
    ev.result()  # {"dice": ..., "dice_pooled": ..., ...}

  Slices are kept in the order given, so `per_slice()["dice"]` of two runs on
  the same test set pairs up for `relative_gain_ci`.
  """

  def __init__(self, kind: str = "logits", spacing_mm=None):
    """kind: 'logits' (positive where > 0) or 'probs' (positive where > 0.5)."""
    if kind not in ("logits", "probs"):
      raise ValueError(f"kind must be 'logits' or 'probs', got {kind!r}")
    self.kind = kind
    self.spacing_mm = spacing_mm
    self._dice, self._hd95, self._ids = [], [], []
    self._inter, self._sizes = [], []

  def update(self, logits_or_probs, ref, patient_ids: Sequence) -> None:
    """Adds a batch: predictions (B,H,W[,1]), masks (B,H,W[,1]), keys (B,)."""
    threshold = 0.0 if self.kind == "logits" else 0.5
    pred = _as_masks(np.asarray(logits_or_probs, np.float32) > threshold, "pred")
    pred, ref = _pair(pred, ref)
    ids = np.asarray(patient_ids)
    if ids.shape != (pred.shape[0],):
      raise ValueError(f"patient_ids: expected {pred.shape[0]} keys, got shape {ids.shape}")
    self._dice.append(dice(pred, ref))
    self._hd95.append(hd95(pred, ref, self.spacing_mm))
    self._ids.append(ids)
    self._inter.append(np.sum(pred & ref, axis=(1, 2)))
    self._sizes.append(pred.sum(axis=(1, 2)) + ref.sum(axis=(1, 2)))

  def per_slice(self) -> dict:
    """{'dice': (N,), 'hd95': (N,), 'patient': (N,)} in update order."""
    if not self._dice:
      return {"dice": np.zeros(0), "hd95": np.zeros(0), "patient": np.zeros(0)}
    return {"dice": np.concatenate(self._dice), "hd95": np.concatenate(self._hd95),
            "patient": np.concatenate(self._ids)}

  def result(self) -> dict:
    """Named metrics over everything added.

    Returns:
      dice (mean per-slice Dice, the primary metric), dice_std, dice_pooled
      (micro), dice_patient (mean of per-patient pooled Dice), hd95 (mean per
      slice, mm), hd95_median, n_slices, n_patients.
    """
    s = self.per_slice()
    n = len(s["dice"])
    if n == 0:
      raise ValueError("SegmentationEvaluator.result: no slices were added")
    inter = np.concatenate(self._inter)
    sizes = np.concatenate(self._sizes)
    keys, inverse = _group(s["patient"], n)
    patient = _dice_from_counts(np.bincount(inverse, inter, len(keys)),
                                np.bincount(inverse, sizes, len(keys)))
    return {"dice": float(s["dice"].mean()), "dice_std": float(s["dice"].std()),
            "dice_pooled": float(_dice_from_counts(inter.sum(), sizes.sum())),
            "dice_patient": float(patient.mean()),
            "hd95": float(s["hd95"].mean()), "hd95_median": float(np.median(s["hd95"])),
            "n_slices": int(n), "n_patients": int(len(keys))}


def false_positives(pred, patient_ids: Sequence, spacing_mm=None) -> dict:
  """False positives on tumor-free slices: any predicted pixel is one.

  A segmenter trained on tumors pasted into healthy slices may learn to see
  tumors everywhere; Dice on tumor slices cannot tell. On slices without
  tumor every predicted tumor pixel is a false positive.

  Args:
    pred: binary predictions (B,H,W[,1]) of tumor-free slices.
    patient_ids: (B,) patient of each slice.
    spacing_mm: pixel size in mm (a scalar or (row, col)) when known; the
      area is then also given in mm^2. None: pixels and fractions only.

  Returns:
    fp_pixels (mean predicted pixels per slice), fp_fraction (that over the
    slice's pixels), fp_mm2 (None without spacing_mm), slices_with_fp
    (fraction of slices with any predicted pixel), per_slice (fp pixels per
    slice, a list), n_slices, n_patients.
  """
  pred = _as_masks(pred, "pred")
  n = pred.shape[0]
  if n == 0:
    raise ValueError("false_positives: no tumor-free slices")
  keys, _ = _group(patient_ids, n)
  counts = pred.sum(axis=(1, 2)).astype(np.int64)
  mean = float(counts.mean())
  mm2 = None
  if spacing_mm is not None:
    sy, sx = _spacing(spacing_mm, pred.shape[1:])
    mm2 = mean * sy * sx
  return {"fp_pixels": mean, "fp_fraction": mean / float(pred.shape[1] * pred.shape[2]),
          "fp_mm2": mm2, "slices_with_fp": float(np.mean(counts > 0)),
          "per_slice": counts.tolist(), "n_slices": int(n), "n_patients": int(len(keys))}
