"""Makes tests/data/real_tcga_du_7294/ from the real sample case in ../shared.

The fixture is the real BraTS-space case TCGA-DU-7294
(../shared/data/brats_real_sample/TCGA-DU-7294, see tests/data/README.md for
its source and licence), cropped to the brain's bounding box (plus a margin)
and subsampled 3x on every axis (every second voxel: values, the negative
brain voxels, the brain mask and the labels stay exact, voxels become 3 mm).
The affine follows, so world positions are kept. Images stay int16, the seg
uint8. Deterministic: gzip level 9, mtime 0.

  .venv/bin/python tests/data/make_real_fixture.py [--src DIR] [--out DIR]
"""

import argparse
import gzip
import os

import nibabel as nib
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CASE = "TCGA-DU-7294"
SRC = os.path.join(ROOT, "..", "shared", "data", "brats_real_sample", CASE)
OUT = os.path.join(HERE, "real_tcga_du_7294")
PARTS = ("t1", "t1ce", "t2", "flair", "seg")
STEP = 3
MARGIN = 2  # full-size voxels around the brain.


def brain_box(volumes):
  brain = np.zeros(volumes["t2"].shape, bool)
  for part in PARTS[:4]:
    brain |= volumes[part] != 0
  box = []
  for axis in range(3):
    others = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero(brain.any(axis=others))
    lo = max(0, idx[0] - MARGIN) // STEP * STEP
    hi = min(brain.shape[axis], idx[-1] + 1 + MARGIN)
    box.append((lo, hi))
  return box


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", default=SRC)
  parser.add_argument("--out", default=OUT)
  args = parser.parse_args()
  images = {p: nib.load(os.path.join(args.src, f"{CASE}_{p}.nii.gz")) for p in PARTS}
  volumes = {p: np.asanyarray(img.dataobj) for p, img in images.items()}
  box = brain_box(volumes)
  cut = tuple(slice(lo, hi, STEP) for lo, hi in box)
  affine = images["t2"].affine @ np.array(
      [[STEP, 0, 0, box[0][0]], [0, STEP, 0, box[1][0]], [0, 0, STEP, box[2][0]],
       [0, 0, 0, 1]], float)
  os.makedirs(args.out, exist_ok=True)
  for part in PARTS:
    data = volumes[part][cut]
    data = data.astype(np.uint8 if part == "seg" else np.int16)
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path = os.path.join(args.out, f"{CASE}_{part}.nii.gz")
    with open(path, "wb") as f:
      f.write(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))
    print(path, data.shape, data.dtype, os.path.getsize(path), "bytes")
  print("box (full-size voxels, inclusive-exclusive):", box)


if __name__ == "__main__":
  main()
