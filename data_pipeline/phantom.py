"""Seeded generator of BraTS-format folders with real anatomy (test data).

Writes the 2018, 2019, 2020, 2021 or 2023-GLI training layouts of
BRATS_FORMAT.md sections 1, 2 and 6: one folder per case with four int16
modalities and a uint8 seg, plus `name_mapping.csv` / `survival_info.csv` for
2020. Ids are real BraTS20 ids, so the site read from the mapping equals the
site the case was drawn for. 2018 and 2019 cases take the Brats18 / BraTS19
ids of the same mapping rows (mapping_rows), in HGG/ and LGG/ folders as in
those releases, so the site in the id is the site the case was drawn for.

Anatomy comes from the MNI152 2009 template and its GM / WM probability maps
that ship inside the nilearn wheel (no download); CSF = brain - GM - WM. The
maps are resampled once per grid into the BraTS grid (240 x 240 x 155, 1 mm,
axcodes L,P,S). Each case then gets one smooth random deformation (plus the
tumor's mass effect) shared by its modalities, an irregular nested tumor,
tissue contrasts per modality, a bias field, noise and a site-dependent gain,
so that per-volume normalisation is needed downstream.

Tumors, contrasts, noise and texture are fitted to eleven real BraTS 2018
cases measured with data_pipeline/volume_stats.py (docs/real_data.md has
the table; the fitted constants below say so): each compartment's contrast
to the brain per modality (data_pipeline/tumor_contrast.py; T2: label 1
about 1.9x the healthy brain's median, edema about 1.4x; T1ce enhancing rim
about 1.4x), the brain's intensity quantiles after normalisation, the local
texture, and tumor size and depth: the whole tumor takes 2-16 % of the brain
(one small case of about 2 %, one large near the superior border of about
14 %, the others 4-12 %), with some tumors reaching to within 5 mm of the
brain's border.

Everything random derives from (seed, version, case number), so a case's
bytes do not depend on which other cases are generated or on num_workers.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import gzip
import io
import logging
import multiprocessing
import os
import shutil
import sys
import time
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from data_pipeline import brats
from data_pipeline import tumor_contrast
from dfgm_jax import errors
from dfgm_jax import stage_io

# Geometry of every BraTS release (BRATS_FORMAT.md 1.3).
BRATS_SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array(
    [[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
# Where the brain sits in a real case (BraTS-GLI-00001-000), in full-size
# voxels, inclusive: x 49-188, y 28-217, z 10-146. The template's bounding box
# is centred on this box and scaled per axis towards its size.
BRAIN_BOX = ((49.0, 188.0), (28.0, 217.0), (10.0, 146.0))
_MAX_TEMPLATE_RESCALE = 0.15

# gzip level of .nii.gz files: level 1 is ~2x faster than 6 for ~3% more bytes.
GZIP_LEVEL = 1

# Site-dependent gain on all four modalities (multi-institution scale spread).
CENTER_GAIN = {
    "CBICA": 1.0,
    "TCIA": 0.6,
    "2013": 1.8,
    "TMC": 0.45,
    brats.default_center("2020"): 1.3,  # The 34 cases new in 2020.
}
_DEFAULT_GAIN = 1.0

# The values below marked "fitted" come from measuring the eleven real BraTS
# 2018 cases and the phantom with data_pipeline/volume_stats.py (the table
# in docs/real_data.md): adjusted by hand, a few rounds, until each
# statistic's phantom median sat near the real median (every one inside the
# real cases' range; tests/test_volume_stats.py checks that).
#
# Mean intensity of (CSF, GM, WM) per modality before gain. Fitted: the
# brain's quantiles after the preprocessing's normalisation (T2's CSF is only
# about twice the WM, so the tissue does not crowd the bottom of the range).
_TISSUE_MEANS = {
    "t1": (380.0, 980.0, 1300.0),
    "t1ce": (1250.0, 3100.0, 3700.0),
    "t2": (1400.0, 760.0, 550.0),
    "flair": (300.0, 1250.0, 950.0),
}
# Tumor compartments get the region / brain contrasts of
# tumor_contrast.TARGET_RATIOS (fitted), solved for per case (see
# _lesion_intensities).
# Smooth intensity heterogeneity inside the tumor (fitted with the noise:
# real tumors are as heterogeneous as their brightest voxels show).
_TEXTURE_STD = 0.2
_TEXTURE_MM = 4.0
_EDGE_MM = 1.0  # Gaussian blur of the compartments' edges.
# Whole tumor / brain volume per tumor kind (fitted: the real cases' whole
# tumors take 2-16 % of the brain, median 8.5 %).
_WT_FRACTIONS = {"small": (0.02, 0.03), "medium": (0.04, 0.11),
                 "large": (0.13, 0.16)}
# Drawn ellipsoid volume / wanted volume: the shape noise enlarges small and
# medium tumors by about 10 % and the brain's edge trims the large border
# tumor by about 10 % (medians over 64 cases at scale 0.4, 8 seeds).
_VOLUME_GAIN = {"small": 0.93, "medium": 0.9, "large": 1.1}
# Noise sigma as a fraction of the WM mean, per modality (fitted: the local
# standard deviation over the healthy brain against its interquartile range,
# volume_stats' texture).
_NOISE_FRACTION = {"t1": 0.022, "t1ce": 0.035, "t2": 0.08, "flair": 0.045}
# Small bright blobs on T1ce (vessels, dura and choroid plexus enhance):
# about this fraction of the brain, in 7-voxel blobs, has its intensities
# multiplied by the gain. Fitted: real T1ce has a long bright tail, so its
# tissue sits low in the normalised range.
_VESSEL_FRACTION = 0.01
_VESSEL_GAIN = {"t1ce": 1.8}
# The brain's rim gets its partial volume with the background raised to this
# power (fitted: real T2 and FLAIR have a longer dark tail below the
# tissue, which sets where the normalisation's low percentile falls).
_RIM_POWER = {"t1": 1, "t1ce": 1, "t2": 2, "flair": 2}
_BIAS_STD = 0.08  # Std of the log bias field.
_BIAS_SPACING_MM = 90.0
# Small and medium tumor centres lie this many largest semi-axes (+ 4 mm)
# below the brain surface (fitted: real tumor centroids lie 16-31 mm deep,
# median 24 mm, and a tenth of a real tumor lies within 5 mm of the border).
_DEPTH_FACTOR = 0.35
_WARP_STD_MM = 1.8  # Std of each displacement component.
_WARP_SPACING_MM = 40.0
_WARP_MARGIN_MM = 14.0  # Brain growth bound: warp + jitter + mass effect.
_MIN_FREE_SLICES = 30

# BraTS20 id blocks (BRATS_FORMAT.md 1.5): (first, last, grade, site token).
SITE_BLOCKS = (
    (1, 129, "HGG", "CBICA"),
    (130, 149, "HGG", "2013"),
    (150, 157, "HGG", "TMC"),
    (158, 179, "HGG", "TCIA01"),
    (180, 213, "HGG", "TCIA02"),
    (214, 225, "HGG", "TCIA03"),
    (226, 233, "HGG", "TCIA04"),
    (234, 237, "HGG", "TCIA05"),
    (238, 245, "HGG", "TCIA06"),
    (246, 259, "HGG", "TCIA08"),
    (260, 269, "LGG", "2013"),
    (270, 270, "LGG", "TMC"),
    (271, 281, "LGG", "TCIA09"),
    (282, 316, "LGG", "TCIA10"),
    (317, 322, "LGG", "TCIA12"),
    (323, 335, "LGG", "TCIA13"),
    (336, 369, "HGG", "NA"),
)
NUM_CASES_2020 = 369
TCGA_PREFIX = {
    "TCIA01": "02", "TCIA02": "06", "TCIA03": "08", "TCIA04": "12",
    "TCIA05": "14", "TCIA06": "19", "TCIA08": "76", "TCIA09": "CS",
    "TCIA10": "DU", "TCIA12": "FG", "TCIA13": "HT",
}
# BraTS 2012/13 case numbers: 20 HGG and 10 LGG, distinct.
_LGG_2013 = (0, 1, 6, 8, 9, 15, 16, 24, 28, 29)
_HGG_2013 = tuple(n for n in range(30) if n not in _LGG_2013)
# Site groups drawn by select_case_numbers. The first eight picks cover every
# site; after that CBICA and TCIA take 4 of every 5 picks.
_PICK_HEAD = ("CBICA", "TCIA-HGG", "TCIA-LGG", "CBICA", "TCIA-HGG", "2013",
              "TMC", "NEW")
_PICK_CYCLE = ("CBICA", "TCIA-HGG", "CBICA", "TCIA-LGG", "OTHER")
_OTHER_CYCLE = ("2013", "TMC", "NEW")
_QUIRK_ID = 355
_ID_SPACE_2021 = 1667  # BraTS2021 ids run 00000..01666.


class PhantomCase(NamedTuple):
  """One generated case.

  Attributes:
    case_id: folder name, e.g. BraTS20_Training_001.
    center: center as brats.discover_cases reports it (CBICA, TCIA, 2013,
      TMC, or BraTS<version> for cases without a site).
    grade: HGG / LGG for 2018 / 2019 / 2020, '' otherwise.
    tumor_voxels: voxels with label > 0.
  """

  case_id: str
  center: str
  grade: str
  tumor_voxels: int


@dataclasses.dataclass(frozen=True)
class PhantomInfo:
  """What generate() wrote.

  Attributes:
    data_dir: the folder holding the case folders (and the 2020 csv files).
    cases: generated cases in id order.
    version: '2018', '2019', '2020', '2021' or '2023'.
    sites: case id -> unmerged site token (TCIA01, CBICA, NA, ...).
  """

  data_dir: str
  cases: list
  version: str
  sites: dict = dataclasses.field(default_factory=dict)

  @property
  def center_of_case(self) -> dict[str, str]:
    return {case.case_id: case.center for case in self.cases}

  @property
  def case_ids(self) -> list[str]:
    return [case.case_id for case in self.cases]


# ---------------------------------------------------------------------------
# Ids, sites and the csv files.


def site_of_number(number: int) -> tuple[str, str]:
  """(BraTS19 site token, grade) of BraTS20 id `number`; 'NA' for new cases."""
  for first, last, grade, site in SITE_BLOCKS:
    if first <= number <= last:
      return site, grade
  raise ValueError(f"BraTS20 id {number} outside 1..{NUM_CASES_2020}")


# Versions whose phantom cases are BraTS20 mapping rows (ids, sites, grades).
MAPPED_VERSIONS = ("2018", "2019", "2020")
# The mapping_rows column of each version's id.
_ID_COLUMN = {"2018": 2, "2019": 4, "2020": 5}


def center_of_number(version: str, number: int) -> str:
  """The center brats.discover_cases assigns to case `number`."""
  if version not in MAPPED_VERSIONS:
    return brats.default_center(version)
  site, _ = site_of_number(number)
  if site == "NA":
    return brats.default_center(version)
  return brats.site_to_center(site)


def case_id_of(version: str, number: int) -> str:
  """The folder name of phantom case `number` (a BraTS20 id for 2018-2020).

  2018 / 2019: the Brats18 / BraTS19 id of BraTS20 row `number`
  (mapping_rows); ValueError where that release has none (TMC in 2018, the
  cases new in 2020).
  """
  if version in brats.SITE_IN_ID_VERSIONS:
    case_id = mapping_rows()[number - 1][_ID_COLUMN[version]]
    if case_id == "NA":
      raise ValueError(f"BraTS20 id {number} has no BraTS {version} id")
    return case_id
  return brats.case_id_for(version, number)


def _ids_of_block(first: int, last: int) -> list[int]:
  return list(range(first, last + 1))


@functools.lru_cache(maxsize=1)
def mapping_rows() -> tuple[tuple[str, ...], ...]:
  """All 369 name_mapping.csv rows (id order), built from SITE_BLOCKS.

  Local ids (CBICA letters, TCIA numbers, TCGA barcodes, TMC numbers) are
  drawn once from a fixed generator, ascending within a site like the real
  file, so they never depend on the generation seed.
  """
  rng = np.random.default_rng(20200369)
  cbica = sorted(rng.choice(26**3, size=129, replace=False))
  cbica_codes = iter("".join(chr(65 + (v // 26**p) % 26) for p in (2, 1, 0))
                     for v in cbica)
  tcia_pool = iter(rng.permutation(np.arange(101, 700))[:167].tolist())
  tcga_pool = iter(rng.permutation(np.arange(1, 10000))[:167].tolist())
  tmc_ids = iter(sorted(rng.choice(np.arange(1000, 30000), 9, replace=False)))
  hgg_2013, lgg_2013 = iter(_HGG_2013), iter(_LGG_2013)
  rows = []
  for first, last, grade, site in SITE_BLOCKS:
    n = last - first + 1
    if site.startswith("TCIA"):
      local = sorted(next(tcia_pool) for _ in range(n))
      barcode = sorted(next(tcga_pool) for _ in range(n))
    for i, number in enumerate(range(first, last + 1)):
      brats20 = brats.case_id_for("2020", number)
      if site == "CBICA":
        code = next(cbica_codes)
        row = (grade, f"Brats17_CBICA_{code}_1", f"Brats18_CBICA_{code}_1",
               "NA", f"BraTS19_CBICA_{code}_1", brats20)
      elif site == "2013":
        k = next(hgg_2013 if grade == "HGG" else lgg_2013)
        row = (grade, f"Brats17_2013_{k}_1", f"Brats18_2013_{k}_1", "NA",
               f"BraTS19_2013_{k}_1", brats20)
      elif site == "TMC":
        row = (grade, "NA", "NA", "NA", f"BraTS19_TMC_{next(tmc_ids):05d}_1",
               brats20)
      elif site.startswith("TCIA"):
        nnn = local[i]
        row = (grade, f"Brats17_TCIA_{nnn}_1", f"Brats18_{site}_{nnn}_1",
               f"TCGA-{TCGA_PREFIX[site]}-{barcode[i]:04d}",
               f"BraTS19_{site}_{nnn}_1", brats20)
      else:
        row = (grade, "NA", "NA", "NA", "NA", brats20)
      rows.append(row)
  assert len(rows) == NUM_CASES_2020
  return tuple(rows)


def _pick_order(group: str) -> list[int]:
  """Ids of a site group, in a fixed order spread over the group's blocks."""
  if group == "TCIA-HGG":
    ids = [n for f, l, g, s in SITE_BLOCKS
           if s.startswith("TCIA") and g == "HGG" for n in _ids_of_block(f, l)]
  elif group == "TCIA-LGG":
    ids = [n for f, l, g, s in SITE_BLOCKS
           if s.startswith("TCIA") and g == "LGG" for n in _ids_of_block(f, l)]
  elif group == "NEW":
    ids = _ids_of_block(336, 369)
  else:
    ids = [n for f, l, _, s in SITE_BLOCKS if s == group
           for n in _ids_of_block(f, l)]
  # A fixed stride visits the whole range early (CBICA 1, 38, 75, ...).
  stride = max(1, int(len(ids) * 0.29)) | 1
  while np.gcd(stride, len(ids)) != 1:
    stride += 2
  return [ids[(i * stride) % len(ids)] for i in range(len(ids))]


def select_case_numbers(version: str, num_cases: int,
                        quirk_355: bool = False) -> list[int]:
  """Case numbers to generate, in pick order (the order sets tumor kinds).

  2020 draws real ids site by site (_PICK_HEAD, then _PICK_CYCLE), so CBICA
  and TCIA dominate (about 40 % each) and every site shows up within eight
  cases. 2018 / 2019 draw the same way among the rows their release has
  (no new-2020 cases; 2018 no TMC). 2021 / 2023 draw spread 5-digit numbers.
  """
  if num_cases < 1:
    raise ValueError(f"num_cases must be >= 1, got {num_cases}")
  if version not in MAPPED_VERSIONS:
    if num_cases > _ID_SPACE_2021:
      raise ValueError(f"num_cases must be <= {_ID_SPACE_2021} for {version}")
    rng = np.random.default_rng(2021)
    return [int(n) for n in rng.permutation(_ID_SPACE_2021)[:num_cases]]
  queues = {g: _pick_order(g) for g in
            ("CBICA", "TCIA-HGG", "TCIA-LGG", "2013", "TMC", "NEW")}
  if version in brats.SITE_IN_ID_VERSIONS:
    rows = mapping_rows()
    column = _ID_COLUMN[version]
    queues = {g: [n for n in q if rows[n - 1][column] != "NA"]
              for g, q in queues.items()}
  available = sum(len(q) for q in queues.values())
  if num_cases > available:
    raise ValueError(f"num_cases must be <= {available} for {version}")
  if quirk_355:  # Move 355 to the front of the new-2020 queue.
    queues["NEW"].remove(_QUIRK_ID)
    queues["NEW"].insert(0, _QUIRK_ID)

  def groups():
    yield from _PICK_HEAD
    others = 0
    while True:
      for group in _PICK_CYCLE:
        if group == "OTHER":
          group = _OTHER_CYCLE[others % len(_OTHER_CYCLE)]
          others += 1
        yield group

  picked = []
  for group in groups():
    if len(picked) == num_cases:
      break
    if queues[group]:
      picked.append(queues[group].pop(0))
    elif not any(queues.values()):
      break
  if quirk_355 and _QUIRK_ID not in picked:
    picked[-1] = _QUIRK_ID
  return picked


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return buffer.getvalue().encode()


def write_name_mapping(path: str, numbers: Sequence[int] | None) -> None:
  """Writes name_mapping.csv with the rows of `numbers` (None: all 369)."""
  rows = mapping_rows()
  if numbers is not None:
    rows = [rows[n - 1] for n in sorted(set(numbers))]
  stage_io.write_bytes(path, _csv_bytes(brats.NAME_MAPPING_HEADER, rows))


def write_survival_info(path: str, numbers: Sequence[int], seed: int) -> None:
  """Writes survival_info.csv for the HGG cases among `numbers`.

  The second HGG row gets a BraTS'19-style non-numeric survival so readers
  are exercised on it.
  """
  rows = []
  for number in sorted(set(numbers)):
    if site_of_number(number)[1] != "HGG":
      continue
    rng = np.random.default_rng([seed, number, 7])
    age = f"{rng.uniform(19.0, 86.6):.3f}"
    days = str(int(rng.integers(5, 1768)))
    if len(rows) == 1:
      days = f"ALIVE ({days} days later)"
    extent = str(rng.choice(["GTR", "GTR", "STR", "NA", "NA"]))
    rows.append((brats.case_id_for("2020", number), age, days, extent))
  stage_io.write_bytes(path, _csv_bytes(brats.SURVIVAL_HEADER, rows))


# ---------------------------------------------------------------------------
# Template anatomy in the BraTS grid.


def grid_shape(scale: float = 1.0) -> tuple[int, int, int]:
  """BraTS grid shape at `scale` (0.4 -> (96, 96, 62))."""
  _check_scale(scale)
  return tuple(max(8, int(round(n * scale))) for n in BRATS_SHAPE)


def grid_affine(scale: float = 1.0) -> np.ndarray:
  """BraTS affine with voxels 1/scale mm wide (same world origin)."""
  _check_scale(scale)
  affine = BRATS_AFFINE.copy()
  affine[:3, :3] /= scale
  return affine


def _check_scale(scale: float) -> None:
  if not 0.0 < scale <= 1.0:
    raise ValueError(f"scale must be in (0, 1], got {scale}")


@dataclasses.dataclass(frozen=True)
class TissueMaps:
  """The undeformed template in a BraTS grid.

  Attributes:
    gm, wm, csf: float32 tissue fractions (csf = brain - gm - wm, clipped).
    brain: bool brain mask (no holes).
    depth_mm: float32 distance to the brain surface inside the brain, 0 out.
    affine: the grid's affine.
    voxel_mm: voxel width.
  """

  gm: np.ndarray
  wm: np.ndarray
  csf: np.ndarray
  brain: np.ndarray
  depth_mm: np.ndarray
  affine: np.ndarray
  voxel_mm: float


def tissue_maps(scale: float = 1.0) -> TissueMaps:
  """The MNI152 2009 tissue maps resampled into the BraTS grid (cached)."""
  return _tissue_maps(grid_shape(scale), float(scale))


@functools.lru_cache(maxsize=4)
def _tissue_maps(shape: tuple[int, int, int], scale: float) -> TissueMaps:
  from nilearn import datasets  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  template = datasets.load_mni152_template(resolution=1)
  mni_affine = template.affine
  # The template is skull-stripped: non-zero = brain. Filling its holes makes
  # dark voxels inside (ventricles) brain, and CSF below.
  brain = ndimage.binary_fill_holes(np.asarray(template.dataobj) > 0)
  gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
  wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
  gm *= brain
  wm *= brain

  # BraTS world -> MNI world: centre the template's box on the target box and
  # scale each axis towards the target size. Both worlds are RAS, so the
  # orientation (BraTS axis1 = A->P, axis2 = I->S) follows from the affines.
  idx = np.argwhere(brain)
  mni_lo = mni_affine[:3, :3] @ idx.min(0) + mni_affine[:3, 3]
  mni_hi = mni_affine[:3, :3] @ idx.max(0) + mni_affine[:3, 3]
  mni_lo, mni_hi = np.minimum(mni_lo, mni_hi), np.maximum(mni_lo, mni_hi)
  box = np.array(BRAIN_BOX)
  world_a = BRATS_AFFINE[:3, :3] @ box[:, 0] + BRATS_AFFINE[:3, 3]
  world_b = BRATS_AFFINE[:3, :3] @ box[:, 1] + BRATS_AFFINE[:3, 3]
  target_lo, target_hi = np.minimum(world_a, world_b), np.maximum(world_a, world_b)
  zoom = np.clip((target_hi - target_lo) / (mni_hi - mni_lo),
                 1 - _MAX_TEMPLATE_RESCALE, 1 + _MAX_TEMPLATE_RESCALE)
  brats_to_mni = np.eye(4)
  brats_to_mni[:3, :3] = np.diag(1.0 / zoom)
  brats_to_mni[:3, 3] = (mni_lo + mni_hi) / 2 - (target_lo + target_hi) / 2 / zoom
  affine = grid_affine(scale)
  # Only the target box plus a margin is resampled; the rest stays 0.
  lo = np.maximum(np.floor((box[:, 0] - 12) * scale).astype(int), 0)
  hi = np.minimum(np.ceil((box[:, 1] + 12) * scale).astype(int) + 1, shape)
  crop = tuple(slice(a, b) for a, b in zip(lo, hi))
  shift = np.eye(4)
  shift[:3, 3] = lo
  voxel_map = np.linalg.inv(mni_affine) @ brats_to_mni @ affine @ shift
  brain = brain.astype(np.float32)
  if scale < 0.75:  # Anti-alias before a coarse resampling.
    gm, wm, brain = (ndimage.gaussian_filter(a, 0.4 / scale) for a in (gm, wm, brain))

  def resample(volume):
    out = np.zeros(shape, np.float32)
    out[crop] = ndimage.affine_transform(
        volume, voxel_map[:3, :3], voxel_map[:3, 3], output_shape=tuple(hi - lo),
        order=1, output=np.float32, prefilter=False)
    return out

  gm, wm, brain_p = (resample(a) for a in (gm, wm, brain))
  csf = np.clip(brain_p - gm - wm, 0.0, 1.0)
  brain_mask = np.zeros(shape, bool)
  brain_mask[crop] = ndimage.binary_fill_holes(brain_p[crop] > 0.5)
  # Depth below the brain surface, on a coarse grid (only places tumors).
  step = 2 if min(shape) > 64 else 1
  coarse = brain_mask[::step, ::step, ::step]
  depth = ndimage.distance_transform_edt(coarse, sampling=step / scale)
  depth = np.repeat(np.repeat(np.repeat(depth, step, 0), step, 1), step, 2)
  depth = (depth[:shape[0], :shape[1], :shape[2]] * brain_mask).astype(np.float32)
  for a in (gm, wm, csf, brain_mask, depth):
    a.setflags(write=False)
  logging.info("phantom: template resampled to %s in %.2fs", shape,
               time.perf_counter() - t0)
  return TissueMaps(gm=gm, wm=wm, csf=csf, brain=brain_mask, depth_mm=depth,
                    affine=affine, voxel_mm=1.0 / scale)


@functools.lru_cache(maxsize=4)
def _sampling_support(shape: tuple[int, int, int], scale: float):
  """Voxels a deformed brain can reach: the brain dilated by a margin.

  Returns:
    (flat indices into the grid, (x, y, z) int32 coordinates of them).
  """
  maps = _tissue_maps(shape, scale)
  step = 2 if min(shape) > 64 else 1
  coarse = ~maps.brain[::step, ::step, ::step]
  outside = ndimage.distance_transform_edt(coarse, sampling=step / scale)
  near = outside <= _WARP_MARGIN_MM + step / scale
  near = np.repeat(np.repeat(np.repeat(near, step, 0), step, 1), step, 2)
  near = near[:shape[0], :shape[1], :shape[2]]
  flat = np.flatnonzero(near)
  xyz = np.unravel_index(flat, shape)
  return flat, tuple(c.astype(np.int32) for c in xyz)


# ---------------------------------------------------------------------------
# Random fields.


def _smooth_basis(n: int, spacing: float) -> np.ndarray:
  """Gaussian bumps every `spacing` voxels over 0..n-1, shape (n, k).

  Rows have unit L2 norm, so a field with iid N(0, 1) control values has unit
  variance at every voxel (no empirical normalisation pass needed).
  """
  k = max(2, int(np.ceil((n - 1) / spacing)) + 2)
  centers = np.linspace(-spacing / 2, n - 1 + spacing / 2, k)
  x = np.arange(n, dtype=np.float64)[:, None]
  basis = np.exp(-0.5 * ((x - centers[None]) / (0.6 * spacing)) ** 2)
  return (basis / np.linalg.norm(basis, axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int],
                  spacing: float) -> np.ndarray:
  """Zero-mean unit-variance smooth random field over a grid.

  A coarse grid of random control values interpolated by separable Gaussian
  bumps: two small contractions and one matrix product, no per-voxel
  filtering.
  """
  b0, b1, b2 = (_smooth_basis(n, spacing) for n in shape)
  coeffs = rng.standard_normal((b0.shape[1], b1.shape[1], b2.shape[1]),
                               dtype=np.float32)
  inner = np.matmul(b1[None], coeffs @ b2.T).reshape(b0.shape[1], -1)
  return (b0 @ inner).reshape(tuple(shape))


# ---------------------------------------------------------------------------
# One case.


@dataclasses.dataclass(frozen=True)
class _CaseSpec:
  """What to generate for one case; `kind` and `with_et` follow the pick
  order and grade (see _case_specs)."""

  version: str
  number: int
  center: str
  grade: str
  kind: str  # 'medium', 'large' or 'small'.
  with_et: bool
  seed: int


def _tumor_kind(pick: int) -> str:
  # Positions 1 and 3 of the pick order: a large border tumor and a small one.
  return {1: "large", 3: "small"}.get(pick, "medium")


def _case_specs(version: str, numbers: Sequence[int], seed: int) -> list[_CaseSpec]:
  specs = []
  for pick, number in enumerate(numbers):
    mapped = version in MAPPED_VERSIONS
    grade = site_of_number(number)[1] if mapped else ""
    if mapped:
      with_et = grade == "HGG"
    else:
      with_et = pick % 4 != 2
    specs.append(_CaseSpec(version=version, number=number,
                           center=center_of_number(version, number), grade=grade,
                           kind=_tumor_kind(pick), with_et=with_et, seed=seed))
  return specs


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
  ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rx @ ry @ rz


@dataclasses.dataclass(frozen=True)
class _Tumor:
  center: np.ndarray  # Voxel coordinates (float).
  semi_axes_mm: np.ndarray
  rotation: np.ndarray
  tc_fraction: float
  ncr_fraction: float
  mass_effect: float  # Fraction of the distance pulled in at the center.


def _radius_for_volume(volume_mm3: float, aspect: np.ndarray) -> float:
  """Radius r of the ellipsoid with semi-axes r * aspect and this volume."""
  return float((3 * volume_mm3 / (4 * np.pi * np.prod(aspect))) ** (1 / 3))


def _plan_tumor(rng: np.random.Generator, spec: _CaseSpec,
                maps: TissueMaps) -> _Tumor:
  """Size, shape and location of the tumor (in template voxels).

  The size is drawn as a fraction of the brain (_WT_FRACTIONS), so the
  tumors span what BraTS gliomas span at every grid scale.
  """
  brain_mm3 = float(np.count_nonzero(maps.brain)) * maps.voxel_mm**3
  low, high = _WT_FRACTIONS[spec.kind]
  # Log-uniform: medium tumors of 3-5 % about as often as of 5-8 %.
  volume = brain_mm3 * float(np.exp(rng.uniform(np.log(low), np.log(high))))
  if spec.kind == "large":
    aspect = rng.uniform(0.9, 1.1, 3)
    radius = _radius_for_volume(volume * _VOLUME_GAIN["large"], aspect)
    axes = radius * aspect
    # Keeps >= 30 tumor-free slices; the lost volume goes to the other axes.
    if axes[2] > 34.0:
      axes[:2] *= np.sqrt(axes[2] / 34.0)
      axes[2] = 34.0
    rotation = _rotation(rng, 20.0)
    need_depth, mass = 0.5 * radius, rng.uniform(0.25, 0.35)
  else:
    aspect = rng.uniform(0.8, 1.2, 3)
    axes = _radius_for_volume(volume * _VOLUME_GAIN[spec.kind], aspect) * aspect
    rotation = _rotation(rng, 30.0)
    need_depth = _DEPTH_FACTOR * axes.max() + 4.0
    mass = rng.uniform(0.1, 0.2) if spec.kind == "small" else rng.uniform(0.15, 0.3)
  depth = maps.depth_mm
  candidates = (depth >= need_depth) & (maps.csf < 0.3)
  if spec.kind == "large":
    # Near the superior border: the top tenth of the allowed centres.
    z = np.nonzero(candidates.any(axis=(0, 1)))[0]
    z_min = z.max() - max(1, int(0.1 * (z.max() - z.min())))
    candidates[:, :, :z_min] = False
  while not candidates.any():  # Shallow brains at coarse scale.
    need_depth *= 0.8
    candidates = depth >= need_depth
  points = np.argwhere(candidates)
  center = points[rng.integers(len(points))].astype(np.float64)
  # Radii relative to the whole tumor; the core keeps >= 2 mm of edema around
  # it and ET >= 1 voxel around the necrosis, so both end up smaller. With an
  # enhancing rim: edema about half of the whole tumor, ET and necrosis about
  # a quarter each; without: non-enhancing tumor 15-45 % (the real LGG
  # sample: 38 %).
  if spec.with_et:
    tc = rng.uniform(0.76, 0.86)
    ncr = tc - rng.uniform(0.17, 0.24)
  else:
    tc, ncr = rng.uniform(0.6, 0.8), 0.0
  return _Tumor(center=center, semi_axes_mm=axes, rotation=rotation,
                tc_fraction=tc, ncr_fraction=ncr, mass_effect=mass)


def _tumor_labels(rng: np.random.Generator, tumor: _Tumor, spec: _CaseSpec,
                  brain: np.ndarray, voxel_mm: float
                  ) -> tuple[tuple[slice, ...], np.ndarray]:
  """Canonical labels (1 NCR, 2 edema, 3 ET) inside the tumor's box.

  Edema is the outer shell everywhere (the core is kept >= 2 mm inside the
  whole tumor), ET surrounds the necrosis, and the whole tumor stays >= 2 mm
  inside the brain.
  """
  shape = brain.shape
  wobble = 0.22
  half = tumor.semi_axes_mm.max() * (1 + 3 * wobble) / voxel_mm + 3
  lo = np.maximum(np.floor(tumor.center - half).astype(int), 0)
  hi = np.minimum(np.ceil(tumor.center + half).astype(int) + 1, shape)
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  box_shape = tuple(hi - lo)
  grid = [(np.arange(a, b, dtype=np.float32) - c) * voxel_mm
          for a, b, c in zip(lo, hi, tumor.center)]
  # Radius relative to a rotated ellipsoid, modulated by smooth noise.
  rho2 = np.zeros(box_shape, np.float32)
  for row, axis in zip(tumor.rotation.astype(np.float32), tumor.semi_axes_mm):
    u = (row[0] * grid[0][:, None, None] + row[1] * grid[1][None, :, None]
         + row[2] * grid[2][None, None, :])
    rho2 += (u / np.float32(axis)) ** 2
  rho = np.sqrt(rho2)
  spacing = max(2.0, 0.6 * tumor.semi_axes_mm[:2].mean() / voxel_mm)

  def noisy(amplitude, noise):
    return rho / np.clip(1 + amplitude * noise, 0.3, 1 + 3 * amplitude)

  shell = max(1, int(round(2.0 / voxel_mm)))
  inside = ndimage.binary_erosion(
      np.pad(brain[box], shell, constant_values=False), iterations=shell)
  inside = inside[(slice(shell, -shell),) * 3]
  wt = (noisy(wobble, _smooth_field(rng, box_shape, spacing)) < 1) & inside
  # The necrosis shares most of the core's shape noise, so the ET ring's
  # thickness varies but rarely vanishes.
  core_noise = _smooth_field(rng, box_shape, spacing)
  core = ((noisy(0.15, core_noise) < tumor.tc_fraction)
          & ndimage.binary_erosion(wt, iterations=shell))
  labels = np.where(wt, 2, 0).astype(np.uint8)
  if spec.with_et:
    ncr_noise = core_noise + 0.5 * _smooth_field(rng, box_shape, spacing)
    ncr = (noisy(0.15, ncr_noise) < tumor.ncr_fraction) & ndimage.binary_erosion(core)
    labels[core] = 3
    labels[ncr] = 1
  else:
    labels[core] = 1
  return box, labels


def _free_slices(brain: np.ndarray, seg: np.ndarray) -> int:
  return int(np.sum(brain.any(axis=(0, 1)) & ~(seg > 0).any(axis=(0, 1))))


class _LesionSystem(NamedTuple):
  """The modality-independent part of _lesion_intensities' linear system.

  Attributes:
    present: labels - 1 of the compartments the tumor has.
    regions: per present compartment, its voxels among the tumor box's brain
      voxels (bool).
    region_coef: [k, j] mean of w_j * texture over present region k.
    brain_coef: [j] sum of w_j * texture over the brain / brain voxels.
  """

  present: list
  regions: list
  region_coef: np.ndarray
  brain_coef: np.ndarray


def _lesion_system(weights: Sequence[np.ndarray], texture: np.ndarray,
                   sel_labels: np.ndarray, num_brain: int) -> _LesionSystem:
  """Sets up _lesion_intensities for one case (see there)."""
  lesion = [w.astype(np.float64) * texture for w in weights]
  present = [k for k in range(3) if np.any(sel_labels == k + 1)]
  regions = [sel_labels == k + 1 for k in present]
  region_coef = np.array([[lesion[j][region].mean() for j in present]
                          for region in regions]).reshape(len(present), -1)
  brain_coef = np.array([lesion[j].sum() / num_brain for j in present])
  return _LesionSystem(present, regions, region_coef, brain_coef)


def _lesion_intensities(healthy: np.ndarray, sel: np.ndarray,
                        tumor_weight: np.ndarray, system: _LesionSystem,
                        ratios: Sequence[float]) -> np.ndarray:
  """Intensities of the compartments (labels 1, 2, 3) of one modality.

  A tumor-box voxel becomes healthy * (1 - sum_j w_j) + sum_j w_j I_j texture,
  so every labelled region's mean and the brain's mean are linear in
  I = (I_1, I_2, I_3): one small solve makes region mean / brain mean equal
  `ratios` exactly (before bias field and noise), whatever the edge blur, the
  tumor's share of the brain and the grid scale.

  Args:
    healthy: tissue intensities of the brain voxels, without tumor.
    sel: indices into `healthy` of the tumor box's brain voxels.
    tumor_weight: sum_j w_j at `sel`.
    system: _lesion_system() of the case.
    ratios: region mean / brain mean wanted for labels 1, 2, 3.

  Returns:
    float64 (I_1, I_2, I_3); 0 for a label the tumor lacks.
  """
  out = np.zeros(3)
  if not system.present:
    return out
  n = healthy.size
  in_box = healthy[sel].astype(np.float64)
  kept = in_box * (1 - tumor_weight)
  brain_const = (float(healthy.sum(dtype=np.float64)) - in_box.sum()
                 + kept.sum()) / n
  wanted = np.array([ratios[k] for k in system.present])
  matrix = system.region_coef - wanted[:, None] * system.brain_coef[None, :]
  rhs = wanted * brain_const - np.array([kept[r].mean() for r in system.regions])
  # A guard for one- or two-voxel regions on coarse grids, where the blur
  # would call for extreme values: stay within 0.2-4x the brain mean.
  mean = float(healthy.mean(dtype=np.float64))
  out[system.present] = np.clip(np.linalg.solve(matrix, rhs), 0.2 * mean,
                                4.0 * mean)
  return out


def _synthesize_case(spec: _CaseSpec, scale: float = 1.0
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Builds one case's volumes.

  Returns:
    ({'t1', 't1ce', 't2', 'flair': int16 volume}, canonical uint8 labels
    {0, 1, 2, 3}).
  """
  maps = tissue_maps(scale)
  shape = maps.brain.shape
  voxel = maps.voxel_mm
  rng = np.random.default_rng([spec.seed, int(spec.version), spec.number])
  tumor = _plan_tumor(rng, spec, maps)

  # One sampling map for every modality: output voxel p reads the template at
  # q = c0 + L (m(p) - c0) + d(p), with m the tumor's mass effect (pulls
  # samples towards the tumor centre, so tissue moves outward), L a small
  # rotation / scaling about the brain centre and d a smooth warp.
  flat, points = _sampling_support(shape, scale)
  rel = [c.astype(np.float32) - np.float32(t) for c, t in zip(points, tumor.center)]
  if tumor.mass_effect > 0:
    sigma = 0.8 * tumor.semi_axes_mm.mean() / voxel
    r2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2
    pull = 1 - np.float32(tumor.mass_effect) * np.exp(r2 / np.float32(-2 * sigma**2))
    rel = [r * pull for r in rel]
  c0 = (np.array([b[0] + b[1] for b in BRAIN_BOX]) / 2) * scale
  linear = _rotation(rng, 2.0) * rng.uniform(0.97, 1.03, 3)[None, :]
  offset = c0 + linear @ (tumor.center - c0)
  q = np.empty((3, len(flat)), np.float32)
  for i in range(3):
    q[i] = np.float32(offset[i])
    for j in range(3):
      q[i] += np.float32(linear[i, j]) * rel[j]
    warp = _smooth_field(rng, shape, _WARP_SPACING_MM / voxel)
    q[i] += np.float32(_WARP_STD_MM / voxel) * warp.reshape(-1)[flat]
  del rel

  def sample(volume):
    return ndimage.map_coordinates(volume, q, order=1, output=np.float32,
                                   mode="constant", cval=0.0, prefilter=False)

  gm, wm, csf = sample(maps.gm), sample(maps.wm), sample(maps.csf)
  total = gm + wm + csf
  keep = total > 0.5
  flat = flat[keep]
  gm, wm, csf, total = gm[keep], wm[keep], csf[keep], total[keep]
  # Partial volume with the background darkens the brain's rim like real
  # skull-stripped data.
  rim = np.minimum(total, 1.0)
  gm, wm, csf = (a / total for a in (gm, wm, csf))
  brain = np.zeros(shape, bool)
  brain.reshape(-1)[flat] = True

  box, box_labels = _tumor_labels(rng, tumor, spec, brain, voxel)
  labels = np.zeros(shape, np.uint8)
  labels[box] = box_labels
  # >= 30 mm of tumor-free brain (30 slices at full size) for healthy slices.
  if _free_slices(brain, labels) < np.ceil(_MIN_FREE_SLICES * scale):
    raise RuntimeError(f"phantom case {spec.number}: too few tumor-free slices")
  # Brain voxels inside the tumor box, as box-local coordinates.
  xyz = np.stack(np.unravel_index(flat, shape)).astype(np.int32)
  in_box = np.ones(len(flat), bool)
  for axis, part in enumerate(box):
    in_box &= (xyz[axis] >= part.start) & (xyz[axis] < part.stop)
  sel = np.flatnonzero(in_box)
  local = tuple(xyz[axis, sel] - part.start for axis, part in enumerate(box))
  # Soft compartment edges, as partial volume and infiltration give real scans.
  edge = max(0.6, _EDGE_MM / voxel)
  soft = [ndimage.gaussian_filter((box_labels == k).astype(np.float32), edge)[local]
          for k in (1, 2, 3)]
  tumor_weight = soft[0] + soft[1] + soft[2]
  texture = 1 + _TEXTURE_STD * _smooth_field(
      rng, box_labels.shape, max(1.5, _TEXTURE_MM / voxel))[local]
  system = _lesion_system(soft, texture, labels.reshape(-1)[flat[sel]], len(flat))
  # Label 1 is necrosis beside an enhancing rim, non-enhancing tumor without.
  ncr_region = "ncr" if spec.with_et else "net"

  gain = CENTER_GAIN.get(spec.center, _DEFAULT_GAIN) * float(np.exp(rng.normal(0, 0.1)))
  # Enhancing vessels (T1ce): their own generator, so that adding them left
  # the other modalities' draws unchanged.
  # Each is a voxel and its six neighbours, around seeds drawn among the
  # brain's voxels (a smooth field thresholded costs more than the case).
  vessel_rng = np.random.default_rng([spec.seed, int(spec.version), spec.number, 1])
  seeds = flat[vessel_rng.integers(len(flat), size=int(_VESSEL_FRACTION / 7 * len(flat)))]
  marked = np.zeros(int(np.prod(shape)), bool)
  for step in (0, 1, shape[2], shape[1] * shape[2]):
    marked[np.clip(seeds + step, 0, marked.size - 1)] = True
    marked[np.clip(seeds - step, 0, marked.size - 1)] = True
  vessels = marked[flat]
  del marked
  images = {}
  for modality in brats.MODALITIES:
    mean_csf, mean_gm, mean_wm = _TISSUE_MEANS[modality]
    values = (csf * np.float32(mean_csf) + gm * np.float32(mean_gm)
              + wm * np.float32(mean_wm)) * rim ** _RIM_POWER[modality]
    if modality in _VESSEL_GAIN:
      values[vessels] *= np.float32(_VESSEL_GAIN[modality])
    ratios = tumor_contrast.TARGET_RATIOS[modality]
    intensities = _lesion_intensities(
        values, sel, tumor_weight, system,
        [ratios[region] for region in (ncr_region, "ed", "et")])
    lesion = sum(w * np.float32(i) for w, i in zip(soft, intensities))
    values[sel] = values[sel] * (1 - tumor_weight) + lesion * texture
    bias = _smooth_field(rng, shape, _BIAS_SPACING_MM / voxel).reshape(-1)[flat]
    values *= np.exp(np.float32(_BIAS_STD) * bias)
    values *= np.float32(gain * np.exp(rng.normal(0, 0.03)))
    sigma = np.float32(_NOISE_FRACTION[modality] * mean_wm * gain)
    # Gaussian noise: at these SNRs Rician noise is indistinguishable from it.
    values += rng.standard_normal(values.shape, dtype=np.float32) * sigma
    out = np.zeros(shape, np.int16)
    out.reshape(-1)[flat] = np.rint(np.clip(values, 1, np.iinfo(np.int16).max))
    images[modality] = out
  return images, labels


# ---------------------------------------------------------------------------
# Writing.


def _nifti_bytes(array: np.ndarray, affine: np.ndarray, compressed: bool) -> bytes:
  import nibabel as nib  # pylint: disable=g-import-not-at-top

  header = nib.Nifti1Header()
  header.set_data_dtype(array.dtype)
  image = nib.Nifti1Image(array, affine, header)
  image.header.set_qform(affine, code=1)
  image.header.set_sform(affine, code=1)
  image.header.set_xyzt_units("mm")  # xyzt_units = 2, as in BraTS.
  data = image.to_bytes()
  # mtime=0 keeps the file bytes a function of the arrays only.
  return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0) if compressed else data


def _write_case(spec: _CaseSpec, case_dir: str, scale: float, compressed: bool,
                quirk_355: bool) -> PhantomCase:
  images, labels = _synthesize_case(spec, scale)
  case_id = case_id_of(spec.version, spec.number)
  file_labels = {canonical: raw
                 for raw, canonical in brats.LABEL_MAPS[spec.version].items()}
  seg = np.zeros_like(labels)
  for canonical in (1, 2, 3):
    seg[labels == canonical] = file_labels[canonical]
  suffix = ".nii.gz" if compressed else ".nii"
  affine = grid_affine(scale)
  os.makedirs(case_dir, exist_ok=True)
  for modality, array in list(images.items()) + [("seg", seg)]:
    stem = brats.file_stem(spec.version, case_id, modality)
    if modality == "seg" and quirk_355 and spec.number == _QUIRK_ID:
      stem = brats.QUIRK_355_SEG_STEM
    stage_io.write_bytes(os.path.join(case_dir, stem + suffix),
                        _nifti_bytes(array, affine, compressed))
  return PhantomCase(case_id=case_id, center=spec.center, grade=spec.grade,
                     tumor_voxels=int(np.count_nonzero(labels)))


def _write_case_job(args) -> PhantomCase:
  return _write_case(*args)


def data_dir_of(out_dir: str, version: str, kaggle_nesting: bool = False) -> str:
  """The folder generate() puts the case folders in."""
  parts = [out_dir]
  if kaggle_nesting:
    parts.append(brats.KAGGLE_OUTER_FOLDER)
  parts.append(brats.DATA_FOLDER_NAMES[version])
  return os.path.join(*parts)


def generate(out_dir: str, version: str = "2020", num_cases: int = 8,
             seed: int = 0, compressed: bool = True, kaggle_nesting: bool = False,
             quirk_355: bool = False, scale: float = 1.0,
             full_mapping: bool = False, num_workers: int = 1) -> PhantomInfo:
  """Writes a BraTS-format training folder of `num_cases` synthetic cases.

  Existing files of the same names are replaced; other files are left alone.

  Args:
    out_dir: where to put the data folder.
    version: '2018', '2019', '2020', '2021' or '2023' (naming, labels, csv
      files; 2018 / 2019 put the cases in HGG/ and LGG/).
    num_cases: how many cases.
    seed: generation seed; the same seed gives identical arrays and files.
    compressed: .nii.gz (official release) or .nii (Kaggle copy).
    kaggle_nesting: 2020 only: nest the data folder in BraTS2020_TrainingData/.
    quirk_355: 2020 only: include case 355 and name its seg file like the
      Kaggle copy (W39_1998.09.19_Segm).
    scale: grid scale in (0, 1]; < 1 gives a coarser grid (voxels 1/scale mm)
      for fast tests.
    full_mapping: 2020 only: write all 369 name_mapping.csv rows instead of
      the generated cases' rows.
    num_workers: processes generating cases in parallel.

  Returns:
    A PhantomInfo describing what was written.
  """
  if version not in brats.VERSIONS:
    raise ValueError(
        f"unknown BraTS version {version!r}; expected one of {brats.VERSIONS}")
  if version != "2020" and (kaggle_nesting or quirk_355 or full_mapping):
    raise ValueError("kaggle_nesting, quirk_355 and full_mapping are 2020-only")
  _check_scale(scale)
  t0 = time.perf_counter()
  numbers = select_case_numbers(version, num_cases, quirk_355)
  specs = _case_specs(version, numbers, seed)
  data_dir = data_dir_of(out_dir, version, kaggle_nesting)
  os.makedirs(data_dir, exist_ok=True)
  # Built once here, so forked workers inherit the caches.
  _sampling_support(grid_shape(scale), float(scale))
  def case_dir(spec):
    if version in brats.SITE_IN_ID_VERSIONS:  # the releases' grade folders.
      return os.path.join(data_dir, spec.grade, case_id_of(version, spec.number))
    return os.path.join(data_dir, case_id_of(version, spec.number))

  jobs = [(spec, case_dir(spec), scale, compressed, quirk_355) for spec in specs]
  if num_workers > 1 and len(jobs) > 1:
    # fork reuses the caches built above, but is unsafe once a multithreaded
    # runtime (JAX, TensorFlow) lives in this process: then spawn.
    threaded = any(m in sys.modules for m in ("jax", "tensorflow"))
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context(
        "fork" if "fork" in methods and not threaded else "spawn")
    with concurrent.futures.ProcessPoolExecutor(
        min(num_workers, len(jobs)), mp_context=context) as pool:
      cases = list(pool.map(_write_case_job, jobs))
  else:
    cases = [_write_case_job(job) for job in jobs]
  if version == "2020":
    write_name_mapping(os.path.join(data_dir, brats.NAME_MAPPING_FILE),
                       None if full_mapping else numbers)
    write_survival_info(os.path.join(data_dir, brats.SURVIVAL_FILE), numbers, seed)
  stage_io.write_json(os.path.join(data_dir, brats.PHANTOM_MARKER),
                      {"kind": "phantom", "version": version, "num_cases": len(numbers)})
  cases = sorted(cases, key=lambda case: case.case_id)
  sites = {case_id_of(version, n): (site_of_number(n)[0]
                                    if version in MAPPED_VERSIONS
                                    else brats.default_center(version))
           for n in numbers}
  logging.info("phantom: %d %s cases in %s (%.1fs)", len(cases), version,
               data_dir, time.perf_counter() - t0)
  return PhantomInfo(data_dir=data_dir, cases=cases, version=version, sites=sites)


# The stage: a phantom folder made once per set of parameters.
DONE_FILE = "phantom_done.json"
BUILD = ".build"
# generate()'s parameters that define the data (config.phantom's fields).
PARAM_DEFAULTS = {"version": "2020", "num_cases": 8, "seed": 0, "scale": 1.0,
                  "compressed": True, "kaggle_nesting": False,
                  "quirk_355": False, "full_mapping": False}


def check_params(params: dict) -> dict:
  """`params` with generate()'s defaults filled in; ConfigError when bad."""
  unknown = sorted(set(params) - set(PARAM_DEFAULTS))
  if unknown:
    raise errors.ConfigError(
        f"config.phantom.{unknown[0]}={params[unknown[0]]!r}: not a phantom "
        f"parameter; allowed: {sorted(PARAM_DEFAULTS)}")
  full = {**PARAM_DEFAULTS, **params}
  if full["version"] not in brats.VERSIONS:
    raise errors.ConfigError(f"config.phantom.version={full['version']!r}: "
                             f"must be one of {brats.VERSIONS}")
  n = full["num_cases"]
  if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
    raise errors.ConfigError(f"config.phantom.num_cases={n!r}: must be a "
                             "positive integer")
  scale = full["scale"]
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
      0 < scale <= 1):
    raise errors.ConfigError(f"config.phantom.scale={scale!r}: must be in "
                             "(0, 1] (1 = the full BraTS grid)")
  if full["version"] != "2020":
    for key in ("kaggle_nesting", "quirk_355", "full_mapping"):
      if full[key]:
        raise errors.ConfigError(f"config.phantom.{key}=True: 2020 only, "
                                 f"not for version {full['version']}")
  return full


def _top_folder(params: dict) -> str:
  """The folder generate() creates directly under its out_dir."""
  if params["kaggle_nesting"]:
    return brats.KAGGLE_OUTER_FOLDER
  return brats.DATA_FOLDER_NAMES[params["version"]]


def run(params: dict, out_dir: str, num_workers: int = 1,
        overwrite: bool = False) -> str:
  """The phantom stage: a BraTS-format folder in `out_dir`, made once.

  The folder is generated aside (out_dir/.build) and moved into place, then
  out_dir/phantom_done.json records the parameters. A rerun with the same
  parameters reuses it; other parameters on a finished folder are refused
  unless `overwrite`.

  Args:
    params: generate()'s data parameters (config.phantom: version,
      num_cases, seed, scale, and optionally compressed, kaggle_nesting,
      quirk_355, full_mapping); missing ones take generate()'s defaults.
    out_dir: the stage's folder.
    num_workers: processes generating cases.
    overwrite: replace a finished folder of other parameters.

  Returns:
    The data folder to preprocess (out_dir/<BraTS data folder>).

  Raises:
    errors.ConfigError: a bad parameter.
    errors.RunMismatch: out_dir holds a phantom of other parameters (names
      them) and overwrite is False.
  """
  full = check_params(params)
  record_path = os.path.join(out_dir, DONE_FILE)
  data_dir = data_dir_of(out_dir, full["version"], full["kaggle_nesting"])
  record = stage_io.read_json(record_path)
  if record is not None and "identity" not in record and "params" in record:
    # A record of the pipeline's earlier phantom stage: {params, data_dir}.
    record = {"identity": {**PARAM_DEFAULTS, **record["params"]}}
    stage_io.write_json(record_path, {**record, "data_dir": data_dir})
  if stage_io.check_done(record_path, full, what="a phantom", overwrite=overwrite,
                         remedy="Pass --overwrite to replace it, or choose "
                         "another output folder.") is not None:
    logging.info("phantom: reusing %s", data_dir)
    return data_dir
  previous = stage_io.read_json(record_path)
  if os.path.exists(record_path):
    os.remove(record_path)  # from now on the folder is not finished.
  build = os.path.join(out_dir, BUILD)
  shutil.rmtree(build, ignore_errors=True)
  info = generate(build, num_workers=num_workers, **full)
  if previous is not None:  # another version's folder would be left behind.
    old = _top_folder({**PARAM_DEFAULTS, **previous["identity"]})
    if old != _top_folder(full):
      shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
  stage_io.replace_dir(os.path.join(build, _top_folder(full)),
                       os.path.join(out_dir, _top_folder(full)))
  shutil.rmtree(build, ignore_errors=True)
  stage_io.mark_done(record_path, full, data_dir=data_dir,
                     num_cases=len(info.cases))
  return data_dir
