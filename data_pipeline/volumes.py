"""Load and validate BraTS NIfTI volumes, canonicalise labels, normalise.

Every check names the file it failed on (BratsDataError), so a user with 369
cases knows which one to look at.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import brats

# Affines of one case must agree to this tolerance (mm); BraTS files are
# written by one pipeline, so any real difference is a different grid.
AFFINE_ATOL = 1e-3
# Share of a volume's six outer faces that one value must fill to be read as
# the background (background_value).
BACKGROUND_FACE_SHARE = 0.5


@dataclasses.dataclass
class CaseVolumes:
  """The validated volumes of one case, in the file's voxel order (x, y, z).

  Attributes:
    images: modality -> float32 volume (raw intensities).
    labels: uint8 volume in the canonical scheme (0 bg, 1 NCR, 2 ED, 3 ET).
    brain: bool volume, the union of the modalities' non-zero voxels.
    zooms: voxel size in mm (x, y, z).
    affine: 4x4 voxel-to-world matrix shared by the case's files.
  """

  images: dict
  labels: np.ndarray
  brain: np.ndarray
  zooms: tuple
  affine: np.ndarray


def _nibabel():
  import nibabel  # pylint: disable=g-import-not-at-top
  return nibabel


def load_header(path: str):
  """Opens a NIfTI file and checks it holds one 3D volume (header only)."""
  nib = _nibabel()
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for garbage files.
    raise brats.BratsDataError(
        path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
  shape = tuple(img.shape)
  if len(shape) == 4 and shape[3] == 1:
    pass  # a singleton 4th axis is harmless; squeezed on read.
  elif len(shape) != 3:
    raise brats.BratsDataError(
        path, f"expected a 3D volume, got shape {shape} (a 4D file such as "
        "the Medical Segmentation Decathlon's BRATS_*.nii.gz is not a BraTS "
        "training case)")
  return img


def read_data(path: str, img) -> np.ndarray:
  """Reads the voxel array, turning truncation and corruption into errors."""
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # EOFError, zlib.error, OSError, ValueError...
    raise brats.BratsDataError(
        path, f"truncated or corrupt voxel data ({type(e).__name__}: {e})"
    ) from e
  if data.ndim == 4:
    data = data[..., 0]
  return data


def _check_finite(path: str, data: np.ndarray) -> None:
  bad = np.size(data) - np.count_nonzero(np.isfinite(data))
  if bad:
    raise brats.BratsDataError(path, f"{bad} non-finite voxel values (NaN/inf)")


def check_voxels(path: str, img) -> None:
  """Reads a modality file to its end: finite values, not all zero."""
  data = read_data(path, img)
  if not np.issubdtype(data.dtype, np.integer):
    _check_finite(path, data)
  if not np.any(data):
    raise brats.BratsDataError(path, "empty brain: every voxel is zero")


def background_value(data: np.ndarray) -> float:
  """The value of a volume's background: the one filling most of its faces.

  BraTS volumes are skull-stripped with background 0, but a volume can carry
  a constant offset (an intensity shift added in conversion, float data
  written with a scl_inter, a "zero" stored as -1024): reading every non-zero
  voxel as brain would then take the whole volume for brain, the healthy
  selection would accept the empty caps and the normalisation's percentiles
  would count the background. The brain touches a face only in tight crops,
  so the value that fills at least BACKGROUND_FACE_SHARE of the six faces
  is the background; without one (not skull-stripped, or cropped inside the
  brain) 0, the BraTS convention.
  """
  faces = np.concatenate([np.ravel(f) for f in (
      data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1])])
  values, counts = np.unique(faces, return_counts=True)
  top = int(np.argmax(counts))
  if counts[top] >= BACKGROUND_FACE_SHARE * faces.size:
    return float(values[top])
  return 0.0


def _check_geometry(path, img, ref_path, ref_img):
  if tuple(img.shape[:3]) != tuple(ref_img.shape[:3]):
    raise brats.BratsDataError(
        path, f"shape {tuple(img.shape[:3])} differs from "
        f"{tuple(ref_img.shape[:3])} of {ref_path}")
  if not np.allclose(img.affine, ref_img.affine, atol=AFFINE_ATOL):
    # The largest difference and where it is, not two 4x4 matrices.
    diff = np.abs(np.asarray(img.affine) - np.asarray(ref_img.affine))
    row, col = np.unravel_index(int(np.argmax(diff)), diff.shape)
    raise brats.BratsDataError(
        path, f"affine differs from that of {ref_path} (by up to "
        f"{diff[row, col]:.4g} at [{row}, {col}]: {img.affine[row, col]:.4g} vs "
        f"{ref_img.affine[row, col]:.4g}; tolerance {AFFINE_ATOL})")


def canonical_labels(path: str, seg: np.ndarray, version: str) -> np.ndarray:
  """Maps a version's seg values to the canonical scheme, validating them."""
  if not np.issubdtype(seg.dtype, np.integer):
    if not np.all(np.isfinite(seg)):
      raise brats.BratsDataError(path, "segmentation has non-finite values")
    rounded = np.rint(seg)
    if np.any(rounded != seg):
      raise brats.BratsDataError(path, "segmentation has non-integer values")
    seg = rounded
  label_map = brats.LABEL_MAPS[version]
  values = set(np.unique(seg).astype(np.int64).tolist())
  unknown = sorted(values - set(label_map))
  if unknown:
    raise brats.BratsDataError(
        path, f"label values {unknown} are not in the BraTS {version} label "
        f"set {sorted(label_map)}")
  lut = np.zeros(max(label_map) + 1, np.uint8)
  for src, dst in label_map.items():
    lut[src] = dst
  return lut[seg.astype(np.int64)]


def load_case(case: brats.Case, modalities, require_all_modalities=True,
              require_seg=True) -> CaseVolumes:
  """Loads and validates one case.

  Args:
    case: the case to load.
    modalities: canonical modality names whose voxels are read.
    require_all_modalities: also require the other BraTS modality files to be
      present with matching geometry, readable to their end, finite and not
      all zero (their voxels are read and dropped).
    require_seg: a case without a seg file is refused; when False it is a
      healthy subject (labels all 0), and a seg file that is there is still
      read and validated (an institute's own volumes, healthy_volumes.py).

  Raises:
    BratsDataError: naming the file and the problem.
  """
  wanted = tuple(modalities)
  checked = brats.MODALITIES if require_all_modalities else wanted
  with_seg = ("seg",) if require_seg or "seg" in case.files else ()
  for modality in tuple(checked) + with_seg:
    if modality not in case.files:
      expected = brats.file_stem(case.version, case.case_id, modality)
      raise brats.BratsDataError(
          case.folder, f"missing {modality} file ({expected}.nii.gz or .nii)")
  headers = {}
  ref_modality = None
  for modality in tuple(checked) + with_seg:
    path = case.files[modality]
    headers[modality] = load_header(path)
    if ref_modality is None:
      ref_modality = modality
    else:
      _check_geometry(path, headers[modality], case.files[ref_modality],
                      headers[ref_modality])

  images = {}
  brain = None
  for modality in wanted:
    path = case.files[modality]
    data = read_data(path, headers[modality]).astype(np.float32)
    _check_finite(path, data)
    # Real BraTS has small negative values inside the brain (interpolation),
    # so the brain is every voxel off the background (0 in BraTS; a constant
    # offset moves it, background_value), not every positive one.
    inside = data != background_value(data)
    if not np.any(inside):
      raise brats.BratsDataError(path, "empty brain: every voxel is zero"
                                 if not np.any(data) else
                                 "empty brain: every voxel holds one value")
    brain = inside if brain is None else (brain | inside)
    images[modality] = data
  # The required files that are not used are read to their end too: a
  # truncated, NaN or all-zero t1 is as bad a case as a bad t2, even when
  # only t2 makes the slices. They do not touch the brain mask.
  for modality in checked:
    if modality not in wanted:
      check_voxels(case.files[modality], headers[modality])
  if with_seg:
    seg_path = case.files["seg"]
    labels = canonical_labels(seg_path, read_data(seg_path, headers["seg"]),
                              case.version)
  else:
    labels = np.zeros(brain.shape, np.uint8)
  header = headers[wanted[0]]
  zooms = tuple(float(z) for z in header.header.get_zooms()[:3])
  return CaseVolumes(images=images, labels=labels, brain=brain, zooms=zooms,
                     affine=np.asarray(header.affine))


@dataclasses.dataclass(frozen=True)
class NormStats:
  lo: float
  hi: float
  brain_voxels: int


def normalise(volume: np.ndarray, brain: np.ndarray, percentiles=(0.5, 99.5)
              ) -> tuple[np.ndarray, NormStats]:
  """Per-volume normalisation over the brain to [-1, 1], background -1.

  Brain voxels are clipped to their [p_lo, p_hi] percentiles and scaled to
  [0, 1] (ALGORITHM.md section 1), then mapped to 2v - 1; voxels outside the
  brain become exactly -1.
  """
  values = volume[brain]
  lo, hi = np.percentile(values, percentiles)
  scale = hi - lo if hi > lo else 1.0
  out = np.full(volume.shape, -1.0, np.float32)
  out[brain] = 2.0 * np.clip((values - lo) / scale, 0.0, 1.0) - 1.0
  return out, NormStats(float(lo), float(hi), int(values.size))
