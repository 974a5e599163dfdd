"""One case -> its selected 2D slices on the output grid (the per-case work).

Runs in worker processes; imports nibabel (through volumes) but nothing
heavier. The result is staged as one .npz per case so that an interrupted
preprocessing run resumes where it stopped.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from data_pipeline import brats
from data_pipeline import slices
from data_pipeline import volumes
from dfgm_jax import stage_io

KINDS = ("tumor", "healthy")


def _slice_stack(norm_images, labels, brain, zs, size, method):
  """Stacks the chosen axial slices: image (n,S,S,C), label and brain (n,S,S)."""
  n = len(zs)
  channels = len(norm_images)
  image = np.empty((n, size, size, channels), np.float32)
  label = np.empty((n, size, size), np.uint8)
  brain_out = np.empty((n, size, size), np.uint8)
  for i, z in enumerate(zs):
    for c, vol in enumerate(norm_images):
      image[i, ..., c] = slices.to_output_grid(slices.axial(vol, z), size,
                                               method, fill=-1.0)
    label[i] = slices.labels_to_output_grid(slices.axial(labels, z), size, method)
    brain_out[i] = slices.mask_to_output_grid(slices.axial(brain, z), size, method)
  return {"image": image, "label": label, "brain": brain_out,
          "z": np.asarray(zs, np.int32)}


def extract(case: brats.Case, cfg: dict) -> tuple[dict, dict]:
  """Loads, validates, normalises one case and cuts its slices.

  Args:
    case: the case.
    cfg: the `data` config section as a plain dict; an optional
      `require_seg` (default True) is passed to volumes.load_case.

  Returns:
    (arrays, meta): arrays holds `<kind>_{image,label,brain,z}` for kind in
    tumor / healthy; meta is JSON-serialisable (ids, normalisation stats...).
  """
  vols = volumes.load_case(case, cfg["modalities"], cfg["require_all_modalities"],
                           cfg.get("require_seg", True))
  norm_images, stats = [], {}
  for modality in cfg["modalities"]:
    norm, s = volumes.normalise(vols.images[modality], vols.brain,
                                tuple(cfg["norm_percentiles"]))
    norm_images.append(norm)
    stats[modality] = {"lo": s.lo, "hi": s.hi}
  zx, zy, zz = vols.zooms
  tumor_area = np.count_nonzero(vols.labels > 0, axis=(0, 1))
  brain_area = np.count_nonzero(vols.brain, axis=(0, 1))
  stride = slices.stride_in_slices(cfg["slice_stride_mm"], zz)
  pixel_mm2 = zx * zy
  slice_pixels = vols.brain.shape[0] * vols.brain.shape[1]
  tumor_z = slices.select_tumor_slices(
      tumor_area, stride, cfg["tumor_slices_per_volume"],
      cfg["min_tumor_area_mm2"] / pixel_mm2)
  # Healthy slices on their own grid when healthy_stride_mm is set (0: the
  # tumor slices' grid).
  healthy_stride = (slices.stride_in_slices(cfg["healthy_stride_mm"], zz)
                    if cfg.get("healthy_stride_mm") else stride)
  healthy_z = slices.select_healthy_slices(
      tumor_area, brain_area, healthy_stride,
      slices.stride_in_slices(cfg["healthy_min_gap_mm"], zz),
      cfg["healthy_min_brain_frac"] * slice_pixels,
      cfg["healthy_slices_per_volume"])
  arrays = {}
  for kind, zs in (("tumor", tumor_z), ("healthy", healthy_z)):
    stack = _slice_stack(norm_images, vols.labels, vols.brain, zs,
                         cfg["image_size"], cfg["spatial"])
    arrays.update({f"{kind}_{k}": v for k, v in stack.items()})
  meta = {
      "case_id": case.case_id, "center": case.center, "grade": case.grade,
      "version": case.version, "shape": list(vols.brain.shape),
      "zooms": [zx, zy, zz], "brain_voxels": int(np.count_nonzero(vols.brain)),
      "tumor_voxels": int(np.count_nonzero(vols.labels)),
      "norm": stats, "num_tumor_slices": len(tumor_z),
      "num_healthy_slices": len(healthy_z),
  }
  return arrays, meta


def staged_path(staging_dir: str, case_id: str) -> str:
  return os.path.join(staging_dir, case_id + ".npz")


def stage(case: brats.Case, cfg: dict, staging_dir: str) -> dict:
  """Extracts a case into `<staging_dir>/<case_id>.npz` (atomic) unless there.

  Returns:
    {'meta': ..., 'reused': bool} on success or {'error': {path, reason}}
    when the case is bad and cfg['on_error'] == 'skip'.
  """
  path = staged_path(staging_dir, case.case_id)
  if os.path.exists(path):
    with np.load(path) as f:
      return {"meta": json.loads(str(f["meta"])), "reused": True}
  try:
    arrays, meta = extract(case, cfg)
  except brats.BratsDataError as e:
    if cfg["on_error"] == "skip":
      return {"error": {"case_id": case.case_id, "path": e.path,
                        "reason": e.reason}}
    raise
  buffer = io.BytesIO()
  np.savez(buffer, meta=np.asarray(json.dumps(meta)), **arrays)
  stage_io.write_bytes(path, buffer.getvalue())  # a rerun never sees half a case.
  return {"meta": meta, "reused": False}


def load_staged(staging_dir: str, case_id: str) -> dict:
  with np.load(staged_path(staging_dir, case_id)) as f:
    return {k: f[k] for k in f.files if k != "meta"}
