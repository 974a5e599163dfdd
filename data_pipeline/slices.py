"""2D slice selection, resampling to the output grid, and patient splits.

Orientation: an axial slice k of a BraTS volume (voxel order x=R->L,
y=A->P, z=I->S) is stored as `vol[:, :, k].T`, i.e. rows run anterior ->
posterior and columns patient-right -> patient-left (radiological view).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np


def stride_in_slices(stride_mm: float, z_mm: float) -> int:
  """A spacing in mm as a number of slices of thickness z_mm (at least 1)."""
  return max(1, int(round(stride_mm / z_mm)))


def select_tumor_slices(tumor_area: np.ndarray, stride: int, max_per_volume: int,
                        min_area: float) -> list[int]:
  """Tumor slices: every `stride`-th slice (z = 0, stride, ...) with enough tumor.

  When more than `max_per_volume` qualify, keep the window of that many
  stride-grid slices around the largest tumor cross-section (BRATS_FORMAT.md
  1.6: the paper's 4.2-5.0 slices per volume fit this rule).

  Args:
    tumor_area: whole-tumor pixel count per axial slice, shape (nz,).
    stride: slice stride.
    max_per_volume: cap per volume, 0 for none.
    min_area: minimum whole-tumor pixels for a slice to count.
  """
  candidates = [z for z in range(0, len(tumor_area), stride)
                if tumor_area[z] >= max(min_area, 1)]
  if max_per_volume and len(candidates) > max_per_volume:
    peak = max(candidates, key=lambda z: (tumor_area[z], -z))
    candidates = sorted(candidates, key=lambda z: (abs(z - peak), z))
    candidates = sorted(candidates[:max_per_volume])
  return candidates


def select_healthy_slices(tumor_area: np.ndarray, brain_area: np.ndarray,
                          stride: int, min_gap: int, min_brain_pixels: float,
                          max_per_volume: int) -> list[int]:
  """Tumor-free slices usable as public healthy backgrounds (BRATS_FORMAT.md 5).

  A candidate is on the stride grid, has no tumor voxel, lies at least
  `min_gap` slices from every tumor slice, and has enough brain (excluding the
  near-empty caps). At most `max_per_volume` are kept, evenly spread.
  """
  tumor_z = np.flatnonzero(tumor_area > 0)
  candidates = []
  for z in range(0, len(tumor_area), stride):
    if tumor_area[z] > 0 or brain_area[z] < max(min_brain_pixels, 1):
      continue
    if tumor_z.size and np.min(np.abs(tumor_z - z)) < min_gap:
      continue
    candidates.append(z)
  if max_per_volume and len(candidates) > max_per_volume:
    picks = np.unique(np.round(
        np.linspace(0, len(candidates) - 1, max_per_volume)).astype(int))
    candidates = [candidates[i] for i in picks]
  return candidates


@functools.lru_cache(maxsize=32)
def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """Linear resampling with antialiasing, as a (n_out, n_in) matrix.

  The triangle kernel is widened by the downsampling factor (as in
  jax.image.resize(antialias=True)), so each output pixel averages the input
  pixels it covers. Rows sum to 1, so a constant background stays constant.
  """
  scale = n_out / n_in
  support = max(1.0, 1.0 / scale)
  centers = (np.arange(n_out) + 0.5) / scale - 0.5
  x = np.arange(n_in)
  weights = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centers[:, None]) / support)
  weights /= weights.sum(axis=1, keepdims=True)
  return weights.astype(np.float32)


def pad_to_square(image: np.ndarray, fill: float) -> np.ndarray:
  h, w = image.shape[:2]
  n = max(h, w)
  if h == w:
    return image
  out = np.full((n, n) + image.shape[2:], fill, image.dtype)
  top, left = (n - h) // 2, (n - w) // 2
  out[top:top + h, left:left + w] = image
  return out


def to_output_grid(image: np.ndarray, size: int, method: str, fill: float
                   ) -> np.ndarray:
  """Maps a 2D (H, W[, C]) float slice onto the size x size output grid.

  Args:
    image: float slice.
    size: output side length.
    method: 'resize' (antialiased linear; aspect kept by padding to a square
      first) or 'pad' (lossless centred zero-padding, e.g. 240 -> 256).
    fill: background value used for padding.
  """
  image = np.asarray(image, np.float32)
  if method == "pad":
    h, w = image.shape[:2]
    if h > size or w > size:
      raise ValueError(f"cannot pad a {h}x{w} slice to {size}x{size}; use "
                       "resize, or a size of at least the slice size")
    out = np.full((size, size) + image.shape[2:], fill, np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = image
    return out
  if method != "resize":
    raise ValueError(f"unknown spatial method {method!r}; use resize or pad")
  # Resample the offset from `fill` so that pure background stays exactly
  # `fill` (weights summing to 1 +- float error would blur it otherwise).
  image = pad_to_square(image, fill) - fill
  r = resample_matrix(image.shape[0], size)
  # Separable: rows then columns (two small matmuls, not one 4-index einsum).
  rows = np.tensordot(r, image, axes=(1, 0))            # (size, W, ...)
  out = np.tensordot(r, rows, axes=(1, 1)).swapaxes(0, 1)  # (size, size, ...)
  return np.ascontiguousarray(out + fill, dtype=np.float32)


def labels_to_output_grid(labels: np.ndarray, size: int, method: str
                          ) -> np.ndarray:
  """Resamples a canonical label slice; consistent with the WT mask.

  A pixel is tumor when at least half of it is whole tumor (area resize, then
  threshold 0.5); a tumor pixel takes the tumor label with the largest area.
  """
  if method == "pad":
    return to_output_grid(labels.astype(np.float32), size, "pad", 0.0
                          ).astype(np.uint8)
  onehot = np.stack([labels == k for k in (1, 2, 3)], axis=-1).astype(np.float32)
  fractions = to_output_grid(onehot, size, "resize", 0.0)
  tumor = fractions.sum(axis=-1) >= 0.5
  return np.where(tumor, np.argmax(fractions, axis=-1) + 1, 0).astype(np.uint8)


def mask_to_output_grid(mask: np.ndarray, size: int, method: str) -> np.ndarray:
  resized = to_output_grid(mask.astype(np.float32), size, method, 0.0)
  return (resized >= 0.5).astype(np.uint8)


def axial(volume: np.ndarray, z: int) -> np.ndarray:
  """Axial slice z in the stored orientation (rows A->P, columns R->L)."""
  return np.ascontiguousarray(volume[:, :, z].T)


def split_patients(case_ids, test_fraction: float, seed: int, center: str
                   ) -> tuple[list[str], list[str]]:
  """Seeded patient-level train/test split of one center.

  test = round-half-up(test_fraction * n): 26 of CBICA's 129 and 33 of TCIA's
  167 for 0.2, the paper's counts (numpy's banker's rounding and sklearn's
  ceil would give other numbers). The center name enters the seed so that
  centers get independent permutations.
  """
  ids = sorted(case_ids)
  n_test = int(np.floor(test_fraction * len(ids) + 0.5))
  rng = np.random.default_rng([seed, zlib.crc32(center.encode())])
  order = rng.permutation(len(ids))
  test = sorted(ids[i] for i in order[:n_test])
  train = sorted(ids[i] for i in order[n_test:])
  return train, test


def split_shortfall(center: str, n: int, test_fraction: float) -> str | None:
  """Why `center`'s n patients leave its train or test split empty, else None.

  Real collections have centers of one or two patients (two CBICA cases
  among eleven): round-half-up(test_fraction * n) is then 0 (no test patient:
  nothing to evaluate the center on) or n (no training patient: its
  federated client has no data). The message names the fractions that give
  both splits a patient (split_patients' rounding).
  """
  n_test = int(np.floor(test_fraction * n + 0.5))
  if 0 < n_test < n:
    return None
  if n < 2:
    fix = "one patient cannot be both; pool it with another center or leave it public"
  else:  # round-half-up(f n) in [1, n-1] <=> f in [0.5 / n, (n - 0.5) / n).
    fix = f"test_fraction in [{0.5 / n:.3g}, {(n - 0.5) / n:.3g}) gives both at least one"
  empty = "test" if n_test == 0 else "train"
  return (f"center {center}: {n} patient{'s' * (n != 1)} and test_fraction="
          f"{test_fraction:g} leave {center}_{empty} empty ({fix})")
