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

Eleven real BraTS 2018 cases (../shared/data/brats18_real, read by
data_pipeline/volume_stats.py; docs/real_data.md has the table) widen that
picture: label 1 is often bright on FLAIR (non-enhancing tumor beside the
necrosis) and only mildly dark on T1, the enhancing rim about 1.4x the
healthy brain's median on T1ce, and whole tumors take 2-16 % of the brain
(median 8.5 %).

TARGET_RATIOS are the phantom's contrasts: fitted so that the phantom's
median region / healthy-brain medians (volume_stats) sit near the real
cases' medians. RATIO_RANGES are the spans a case's contrast_ratios are
accepted in: the real cases' spans, widened a little for bias fields,
partial volume and tumor-to-tumor variation; the real sample lies inside
every one.

Sizes: edema is about half the whole tumor, the enhancing rim a fifth and
necrosis the rest (the real cases' medians: ED 55 %, ET 20 %, NCR 16 %).
WT_FRACTION_RANGE and SHARE_RANGES encode that (the real sample: 1.94 %,
ED 62 %).
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

# Region mean / brain mean per modality, fitted to the real cases (see the
# module docstring). 'ncr' is necrosis of a tumor with an enhancing rim,
# 'net' non-enhancing tumor of a tumor without one (both canonical label 1).
TARGET_RATIOS = {
    "t1": {"ncr": 0.88, "net": 0.88, "ed": 1.02, "et": 0.98},
    "t1ce": {"ncr": 0.78, "net": 0.85, "ed": 1.0, "et": 1.36},
    "t2": {"ncr": 1.78, "net": 1.71, "ed": 1.29, "et": 1.5},
    "flair": {"ncr": 1.93, "net": 1.89, "ed": 1.82, "et": 1.85},
}

# Accepted spans of region mean / brain mean, per modality and region: the
# eleven real cases' spans (contrast_ratios), widened by about 0.1.
RATIO_RANGES = {
    "t1": {"ncr": (0.5, 1.4), "ed": (0.8, 1.3), "et": (0.75, 1.25),
           "wt": (0.7, 1.25)},
    "t1ce": {"ncr": (0.45, 1.1), "ed": (0.65, 1.2), "et": (0.85, 1.85),
             "wt": (0.65, 1.4)},
    "t2": {"ncr": (1.1, 2.4), "ed": (0.9, 1.7), "et": (0.8, 1.9),
           "wt": (1.05, 1.85)},
    "flair": {"ncr": (1.0, 2.35), "ed": (1.1, 2.45), "et": (1.0, 2.75),
              "wt": (1.1, 2.25)},
}

# Whole tumor / brain voxels (the real cases: 2-20 % of the voxels non-zero
# in every modality), and each sub-region's share of the whole tumor (ET and
# NCR only where the tumor has an enhancing rim).
WT_FRACTION_RANGE = (0.015, 0.21)
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

