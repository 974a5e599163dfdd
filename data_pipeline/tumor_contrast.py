"""How bright tumor regions are against the brain, and how big tumors are.

One measuring function serves the phantom generator's checks and real data
alike: per modality, the mean intensity of a tumor region divided by the mean
intensity of the whole brain (the voxels non-zero in every modality, tumor
included), and the whole tumor's share of the brain with its sub-regions'
shares of the whole tumor.

Measured on the one real case we hold (/work/shared/data/brats_real_sample/
TCGA-DU-7294: TCGA-LGG, skull-stripped and registered to SRI24 by the BraTS
Toolkit; seg = majority vote of five BraTS 2020 algorithms, labels 1 and 2
only, no enhancing tumor), with contrast_ratios() and tumor_fractions():

  region mean / brain mean   NCR/NET    ED     WT
  t1                           0.58    1.03   0.86
  t1ce                         0.54    0.94   0.79
  t2                           1.69    1.33   1.47
  flair                        1.66    1.82   1.76

  brain 1,245,641 voxels; WT 24,188 voxels = 1.94 % of the brain
  (NCR/NET 38 %, ED 62 % of WT), 40 axial slices (z 93-132).

A single LGG case shows neither enhancing tumor nor true necrosis, so the
table below adds what radiology says of high-grade gliomas (and
BRATS_FORMAT.md section 6): the enhancing rim is bright on T1ce (about twice
the brain), iso- to hypointense on T1 and moderately bright on T2 / FLAIR;
necrosis is dark on T1 and T1ce, very bright on T2 (fluid) but partly
suppressed on FLAIR, well below the edema. In a low-grade glioma label 1 is
non-enhancing tumor, bright on FLAIR as measured above, so NCR has two FLAIR
values.

TARGET_RATIOS are the phantom's contrasts: the real case's values where it
has the region, radiology's where it has not. RATIO_RANGES are the spans a
BraTS case's ratios are accepted in, wide enough for bias fields, partial
volume and tumor-to-tumor variation (issue 12 reports T2 WT / brain of
1.17-1.47 on the real cases looked at; T1 WT reaches 1.05 when edema, 1.03
on T1 above, dominates a small tumor); the real case lies inside every one.

Sizes: BraTS glioma whole tumors are roughly 1-15 % of the brain (median
about 5 %); in high-grade cases edema is about half the whole tumor, the
enhancing rim a quarter and necrosis the rest. WT_FRACTION_RANGE and
SHARE_RANGES encode that (the real case: 1.94 %, ED 62 %).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

# Canonical labels (brats.CANONICAL_LABELS) of each region; 'wt' is all > 0.
REGION_LABELS = {"ncr": (1,), "ed": (2,), "et": (3,), "wt": (1, 2, 3)}

# The docstring's table: contrast_ratios() of the real sample TCGA-DU-7294
# (canonical labels: 1 NCR/NET, 2 ED; no ET), and its tumor_fractions().
REAL_SAMPLE_RATIOS = {
    "t1": {"ncr": 0.58, "ed": 1.03, "wt": 0.86},
    "t1ce": {"ncr": 0.54, "ed": 0.94, "wt": 0.79},
    "t2": {"ncr": 1.69, "ed": 1.33, "wt": 1.47},
    "flair": {"ncr": 1.66, "ed": 1.82, "wt": 1.76},
}
REAL_SAMPLE_FRACTIONS = {"wt": 0.0194, "ncr": 0.38, "ed": 0.62, "et": 0.0}

# Region mean / brain mean per modality (see the module docstring). 'ncr' is
# necrosis of a tumor with an enhancing rim, 'net' non-enhancing tumor of a
# tumor without one (both canonical label 1).
TARGET_RATIOS = {
    "t1": {"ncr": 0.58, "net": 0.58, "ed": 1.0, "et": 0.85},
    "t1ce": {"ncr": 0.5, "net": 0.54, "ed": 0.94, "et": 1.9},
    "t2": {"ncr": 1.75, "net": 1.69, "ed": 1.36, "et": 1.25},
    "flair": {"ncr": 1.1, "net": 1.66, "ed": 1.82, "et": 1.45},
}

# Accepted spans of region mean / brain mean, per modality and region.
RATIO_RANGES = {
    "t1": {"ncr": (0.35, 0.85), "ed": (0.75, 1.15), "et": (0.6, 1.1),
           "wt": (0.65, 1.05)},
    "t1ce": {"ncr": (0.3, 0.85), "ed": (0.7, 1.1), "et": (1.3, 2.6),
             "wt": (0.65, 1.35)},
    "t2": {"ncr": (1.3, 2.2), "ed": (1.1, 1.7), "et": (1.0, 1.6),
           "wt": (1.1, 1.6)},
    "flair": {"ncr": (0.8, 2.0), "ed": (1.4, 2.3), "et": (1.1, 1.9),
              "wt": (1.3, 2.1)},
}

# Whole tumor / brain voxels, and each sub-region's share of the whole tumor
# (ET and NCR only where the tumor has an enhancing rim).
WT_FRACTION_RANGE = (0.01, 0.15)
SHARE_RANGES = {"ed": (0.3, 0.9), "et": (0.08, 0.45), "ncr": (0.03, 0.45)}


def brain_mask(images: Mapping[str, np.ndarray]) -> np.ndarray:
  """Voxels non-zero in every modality.

  `!= 0`, not `> 0`: interpolation leaves small negative values inside real
  brains (the real sample's T2 reaches -122).
  """
  masks = [np.asarray(image) != 0 for image in images.values()]
  return np.logical_and.reduce(masks)


def contrast_ratios(images: Mapping[str, np.ndarray], labels: np.ndarray
                    ) -> dict[str, dict[str, float]]:
  """Region mean / brain mean per modality.

  Args:
    images: modality -> volume (any subset of brats.MODALITIES).
    labels: canonical labels (0 background, 1 NCR/NET, 2 ED, 3 ET).

  Returns:
    {modality: {region: ratio}} for the regions in REGION_LABELS that hold
    at least one brain voxel.
  """
  brain = brain_mask(images)
  regions = {name: np.isin(labels, codes) & brain
             for name, codes in REGION_LABELS.items()}
  out = {}
  for modality, image in images.items():
    image = np.asarray(image, np.float64)
    brain_mean = image[brain].mean()
    out[modality] = {name: float(image[mask].mean() / brain_mean)
                     for name, mask in regions.items() if mask.any()}
  return out


def tumor_fractions(brain: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """'wt': whole tumor / brain voxels; 'ncr', 'ed', 'et': shares of WT."""
  wt = int(np.count_nonzero((labels > 0) & brain))
  out = {"wt": wt / max(int(np.count_nonzero(brain)), 1)}
  for name in ("ncr", "ed", "et"):
    region = np.isin(labels, REGION_LABELS[name]) & brain
    out[name] = int(np.count_nonzero(region)) / max(wt, 1)
  return out

