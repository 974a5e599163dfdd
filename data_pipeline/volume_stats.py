"""What a BraTS case looks like, in numbers: contrasts, histogram, texture,
tumor size and position.

One function (case_stats) measures a case the same way whether it is real or
the phantom's (data_pipeline/phantom.py), so the phantom can be fitted to
real cases and checked against them (launch/phantom_stats.py). Every
statistic is a flat `name -> float`, so a set of cases summarises per name
(summarise: median, quartiles, range) and two sets compare per name
(compare).

Per modality (t1, t1ce, t2, flair), with the brain = voxels non-zero in any
modality (as data_pipeline/volumes.load_case) and the healthy brain = brain
without tumor:
  <m>.ratio.<region>  median of the region / median of the healthy brain,
                      for ncr (label 1), ed (2), et (3) and wt (all > 0);
                      absent where the case lacks the region.
  <m>.q<NN>           quantiles of the brain after the preprocessing's
                      normalisation (volumes.normalise: [-1, 1]).
  <m>.texture         mean local standard deviation (3 x 3 x 3 voxels) over
                      the healthy brain's interior / the healthy brain's
                      interquartile range: noise and fine structure against
                      the tissue contrast.
Per case:
  size.wt_voxels, size.wt_fraction  whole tumor, and its share of the brain.
  size.<region>_share  ncr, ed, et voxels / whole tumor voxels.
  position.x|y|z     tumor centroid inside the brain's bounding box (0 at
                     the box's low edge, 1 at its high edge, array axes).
  position.depth_mm  distance from the centroid to the brain's border.
  position.border_share  share of the tumor within 5 mm of the border.
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from data_pipeline import brats
from data_pipeline import volumes
from dfgm_jax import errors

MODALITIES = ("t1", "t1ce", "t2", "flair")
# Canonical labels (brats.CANONICAL_LABELS) of each tumor region.
REGIONS = {"ncr": (1,), "ed": (2,), "et": (3,), "wt": (1, 2, 3)}
QUANTILES = (5, 25, 50, 75, 95)
TEXTURE_WINDOW = 3
BORDER_MM = 5.0


def brain_of(images: Mapping[str, np.ndarray]) -> np.ndarray:
  """Voxels non-zero in any modality (the preprocessing's brain mask)."""
  return np.logical_or.reduce([np.asarray(v) != 0 for v in images.values()])


def _interior(mask: np.ndarray) -> np.ndarray:
  """Voxels whose whole texture window lies in `mask`."""
  full = ndimage.uniform_filter(mask.astype(np.float32), TEXTURE_WINDOW)
  return full > 1 - 1e-3


def _texture(image: np.ndarray, healthy: np.ndarray, inner: np.ndarray) -> float:
  """Mean local std over `inner` / the healthy brain's IQR.

  Only voxels whose whole window is healthy brain (`inner`) count, so the
  brain's and the tumor's edges do not pass for texture.
  """
  size = TEXTURE_WINDOW
  if not inner.any():
    return float("nan")
  x = np.where(healthy, image, np.float32(0))
  mean = ndimage.uniform_filter(x, size)
  mean_sq = ndimage.uniform_filter(x * x, size)
  local_std = np.sqrt(np.maximum(mean_sq[inner] - mean[inner] ** 2, 0.0))
  q25, q75 = np.percentile(image[healthy], (25, 75))
  return float(local_std.mean() / max(q75 - q25, 1e-6))


def case_stats(images: Mapping[str, np.ndarray], labels: np.ndarray,
               zooms: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
  """The module docstring's statistics of one case.

  Args:
    images: modality -> volume (any subset of MODALITIES), same shape.
    labels: canonical labels (0 background, 1 NCR/NET, 2 ED, 3 ET).
    zooms: voxel size in mm (distances).

  Returns:
    Flat {statistic name: value}.

  Raises:
    ValueError: the case has no tumor or no healthy brain.
  """
  brain = brain_of(images)
  # Everything is measured inside the brain's bounding box (plus one voxel):
  # the same numbers at a fraction of the cost.
  box = np.argwhere(brain)
  crop = tuple(slice(max(a - 1, 0), b + 2) for a, b in zip(box.min(0), box.max(0)))
  brain = brain[crop]
  labels = np.asarray(labels)[crop]
  images = {m: np.asarray(v)[crop] for m, v in images.items()}
  tumor = (labels > 0) & brain
  healthy = brain & ~tumor
  if not tumor.any() or not healthy.any():
    raise ValueError("case_stats needs a tumor and healthy brain")
  inner = _interior(healthy)
  regions = {name: np.isin(labels, codes) & brain for name, codes in REGIONS.items()}
  out = {}
  for modality, image in images.items():
    image = np.asarray(image, np.float32)
    reference = float(np.median(image[healthy]))
    for name, mask in regions.items():
      if mask.any():
        out[f"{modality}.ratio.{name}"] = float(np.median(image[mask]) / reference)
    normalised, _ = volumes.normalise(image, brain)
    for q, value in zip(QUANTILES, np.percentile(normalised[brain], QUANTILES)):
      out[f"{modality}.q{q:02d}"] = float(value)
    out[f"{modality}.texture"] = _texture(image, healthy, inner)

  wt = int(np.count_nonzero(tumor))
  out["size.wt_voxels"] = float(wt)
  out["size.wt_fraction"] = wt / int(np.count_nonzero(brain))
  for name in ("ncr", "ed", "et"):
    out[f"size.{name}_share"] = int(np.count_nonzero(regions[name])) / wt

  box = np.argwhere(brain)
  lo, hi = box.min(0), box.max(0)
  centroid = np.argwhere(tumor).mean(0)
  for axis, name in enumerate("xyz"):
    out[f"position.{name}"] = float((centroid[axis] - lo[axis])
                                    / max(hi[axis] - lo[axis], 1))
  # Distance to the nearest non-brain voxel (a brain touching the array's
  # edge counts the edge as border).
  depth = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=zooms)
  depth = depth[(slice(1, -1),) * 3]
  out["position.depth_mm"] = float(depth[tuple(np.floor(centroid + 0.5).astype(int))])
  out["position.border_share"] = float(np.mean(depth[tumor] <= BORDER_MM))
  return out


def summarise(rows: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
  """Per statistic over cases: n, median, q25, q75, min, max (NaNs left out)."""
  rows = list(rows)
  names = sorted({name for row in rows for name in row})
  out = {}
  for name in names:
    values = np.array([row[name] for row in rows if name in row], np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
      continue
    q25, median, q75 = np.percentile(values, (25, 50, 75))
    out[name] = {"n": int(values.size), "median": float(median),
                 "q25": float(q25), "q75": float(q75),
                 "min": float(values.min()), "max": float(values.max())}
  return out


def compare(candidate: Mapping[str, Mapping[str, float]],
            reference: Mapping[str, Mapping[str, float]],
            tolerance: Mapping[str, float] | None = None
            ) -> dict[str, dict[str, float | bool]]:
  """Is the candidate's median inside the reference's range, per statistic?

  Args:
    candidate, reference: summarise() outputs (e.g. phantom and real cases).
    tolerance: statistic name -> absolute slack added to both ends of the
      reference range (default 0).

  Returns:
    For each statistic both summaries have: candidate median, reference
    median, min and max, `inside` (bool) and `distance` (0 inside, else how
    far outside the slackened range).
  """
  tolerance = tolerance or {}
  out = {}
  for name in sorted(set(candidate) & set(reference)):
    value = candidate[name]["median"]
    slack = tolerance.get(name, 0.0)
    lo, hi = reference[name]["min"] - slack, reference[name]["max"] + slack
    distance = max(lo - value, value - hi, 0.0)
    out[name] = {"candidate": value, "reference": reference[name]["median"],
                 "min": reference[name]["min"], "max": reference[name]["max"],
                 "inside": distance == 0.0, "distance": float(distance)}
  return out


def measure_folder(brats_dir: str, max_cases: int | None = None,
                   progress=None) -> dict[str, dict[str, float]]:
  """case_stats of every case of a BraTS training folder (any layout).

  Args:
    brats_dir: what brats.discover_cases reads (phantom or real).
    max_cases: measure only the first this many cases (id order).
    progress: called with (case_id, seconds) after each case, or None.

  Returns:
    case id -> case_stats row, plus the case's center under 'center'
    (a string) for the report.

  Raises:
    errors.UserError: no case folders, or a case without a tumor.
  """
  cases = sorted(brats.discover_cases(brats_dir), key=lambda c: c.case_id)
  if not cases:
    raise errors.UserError(f"{brats_dir}: no BraTS case folders found")
  out = {}
  for case in cases[:max_cases]:
    t0 = time.perf_counter()
    loaded = volumes.load_case(case, MODALITIES)
    try:
      row = case_stats(loaded.images, loaded.labels, loaded.zooms)
    except ValueError as exc:
      raise errors.UserError(f"{case.folder}: {exc}") from None
    out[case.case_id] = {"center": case.center, **row}
    if progress is not None:
      progress(case.case_id, time.perf_counter() - t0)
  return out


def numeric_rows(cases: Mapping[str, Mapping]) -> list[dict[str, float]]:
  """measure_folder's rows without their non-numeric fields (summarise's input)."""
  return [{k: v for k, v in row.items() if not isinstance(v, str)}
          for row in cases.values()]
