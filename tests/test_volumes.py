"""Validation of every bad input, and the real BraTS case (data_pipeline/volumes.py)."""

import gzip
import os
import shutil

import numpy as np
import pytest

from data_pipeline import brats
from data_pipeline import case_slices
from data_pipeline import volumes
from tests.conftest import (REAL_FIXTURE, REAL_ID, REAL_SAMPLE, make_case,
                            require_shared, write_nifti)

T2 = ("t2",)


def _case(tmp_path, version="2020", number=1, **kw):
  make_case(str(tmp_path), version, number, **kw)
  return brats.discover_cases(str(tmp_path))[0]


def test_good_case_loads_with_canonical_labels(tmp_path):
  case = _case(tmp_path)
  vols = volumes.load_case(case, T2)
  assert set(np.unique(vols.labels)) == {0, 1, 2, 3}  # 2020's 4 -> 3.
  assert vols.brain.any() and vols.images["t2"].dtype == np.float32


def test_2023_label_3_is_enhancing_and_kept(tmp_path):
  case = _case(tmp_path, version="2023")
  vols = volumes.load_case(case, T2)
  assert np.count_nonzero(vols.labels == 3) > 0


def test_truncated_gzip_names_the_file(tmp_path):
  case = _case(tmp_path)
  path = case.files["t2"]
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(brats.BratsDataError) as e:
    volumes.load_case(case, T2)
  assert e.value.path == path
  assert "truncated" in e.value.reason or "not a readable" in e.value.reason


def test_garbage_file_names_the_file(tmp_path):
  case = _case(tmp_path)
  with open(case.files["seg"], "wb") as f:
    f.write(gzip.compress(b"this is not a nifti file" * 10))
  with pytest.raises(brats.BratsDataError, match="not a readable NIfTI") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.files["seg"]


@pytest.mark.parametrize("modality", ["t2", "flair", "seg"])
def test_missing_file_names_the_case_and_modality(tmp_path, modality):
  case = _case(tmp_path)
  os.remove(case.files[modality])
  case = brats.discover_cases(str(tmp_path))[0]
  if modality == "seg":
    # The quirk rule must not pick a modality file as the segmentation.
    assert "seg" not in case.files
  with pytest.raises(brats.BratsDataError, match=f"missing {modality} file") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.folder


def test_missing_unused_modality_allowed_when_not_required(tmp_path):
  case = _case(tmp_path)
  os.remove(case.files["flair"])
  case = brats.discover_cases(str(tmp_path))[0]
  volumes.load_case(case, T2, require_all_modalities=False)


def test_shape_mismatch_names_the_file(tmp_path):
  case = _case(tmp_path)
  write_nifti(case.files["seg"], np.zeros((24, 24, 19), np.uint8))
  with pytest.raises(brats.BratsDataError, match=r"shape \(24, 24, 19\) differs") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.files["seg"]


def test_affine_mismatch_names_the_file(tmp_path):
  case = _case(tmp_path)
  img = np.zeros((24, 24, 20), np.int16)
  img[5:15, 5:15, 5:15] = 100
  write_nifti(case.files["flair"], img, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
  with pytest.raises(brats.BratsDataError, match="affine differs") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.files["flair"]
  # One line with the largest difference, not two 4x4 matrices.
  assert "\n" not in str(e.value)
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  most = np.abs(nib.load(case.files["flair"]).affine
                - nib.load(case.files["t1"]).affine).max()
  assert f"(by up to {most:.4g} at [" in str(e.value)
  assert str(e.value).endswith(f"; tolerance {volumes.AFFINE_ATOL})")


def test_a_header_only_nifti_is_one_line(tmp_path):
  case = _case(tmp_path)
  path = case.files["flair"]
  with open(path, "rb") as f:  # keep only the 352-byte header.
    header = (gzip.decompress(f.read()) if path.endswith(".gz") else f.read())[:352]
  with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
    f.write(header)
  with pytest.raises(brats.BratsDataError, match="truncated or corrupt voxel data") as e:
    volumes.load_case(case, T2)
  assert e.value.path == path and "\n" not in str(e.value)
  assert "could the file be damaged?" in str(e.value)  # nibabel's text, kept.


def test_label_3_in_a_2020_case_is_rejected(tmp_path):
  labels = np.zeros((24, 24, 20), np.uint8)
  labels[10:12, 10:12, 10:12] = 3
  case = _case(tmp_path, labels=labels)
  with pytest.raises(brats.BratsDataError, match=r"label values \[3\]") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.files["seg"]


def test_non_integer_labels_rejected(tmp_path):
  case = _case(tmp_path)
  write_nifti(case.files["seg"], np.full((24, 24, 20), 0.5, np.float32))
  with pytest.raises(brats.BratsDataError, match="non-integer"):
    volumes.load_case(case, T2)


def test_nans_name_the_file(tmp_path):
  case = _case(tmp_path)
  vol = np.ones((24, 24, 20), np.float32)
  vol[3, 4, 5] = np.nan
  write_nifti(case.files["t2"], vol)
  with pytest.raises(brats.BratsDataError, match="1 non-finite") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.files["t2"]


def test_empty_brain_names_the_file(tmp_path):
  case = _case(tmp_path)
  write_nifti(case.files["t2"], np.zeros((24, 24, 20), np.int16))
  with pytest.raises(brats.BratsDataError, match="empty brain") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.files["t2"]


def _truncate(path):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def _nan_volume(path):
  vol = np.ones((24, 24, 20), np.float32)
  vol[3, 4, 5] = np.nan
  write_nifti(path, vol)


def _zero_volume(path):
  write_nifti(path, np.zeros((24, 24, 20), np.int16))


@pytest.mark.parametrize("spoil,reason", [(_truncate, "truncated"),
                                          (_nan_volume, "1 non-finite"),
                                          (_zero_volume, "empty brain")])
def test_a_bad_required_file_that_is_not_read_still_fails(tmp_path, spoil, reason):
  # Issue 11 item 11: t1 is required (require_all_modalities) but only t2
  # makes the slices; a bad t1 used to pass as a good case.
  case = _case(tmp_path)
  spoil(case.files["t1"])
  with pytest.raises(brats.BratsDataError, match=reason) as e:
    volumes.load_case(case, T2, require_all_modalities=True)
  assert e.value.path == case.files["t1"]
  # Not required: not read, not checked (the slices need only t2).
  vols = volumes.load_case(case, T2, require_all_modalities=False)
  assert set(vols.images) == {"t2"}


def test_4d_file_rejected(tmp_path):
  case = _case(tmp_path)
  write_nifti(case.files["t2"], np.ones((24, 24, 20, 4), np.int16))
  with pytest.raises(brats.BratsDataError, match="expected a 3D volume"):
    volumes.load_case(case, T2)


def test_normalise_maps_brain_to_unit_range_background_minus_one():
  vol = np.zeros((10, 10, 10), np.float32)
  vol[2:8, 2:8, 2:8] = np.linspace(-50, 1000, 216).reshape(6, 6, 6)
  brain = vol != 0
  out, stats = volumes.normalise(vol, brain, (0.5, 99.5))
  assert np.all(out[~brain] == -1.0)
  assert out[brain].min() == -1.0 and out[brain].max() == 1.0
  assert stats.brain_voxels == 216 and stats.lo < 0


def _as_brats_2020(source, root):
  """The real case's files at `source` copied into a BraTS 2020 layout."""
  root = root / "MICCAI_BraTS2020_TrainingData"
  folder = root / "BraTS20_Training_042"
  folder.mkdir(parents=True)
  for m in brats.MODALITIES + ("seg",):
    shutil.copy(os.path.join(source, f"{REAL_ID}_{m}.nii.gz"),
                folder / f"BraTS20_Training_042_{m}.nii.gz")
  return brats.discover_cases(str(root.parent))[0]


@pytest.fixture(scope="module")
def real_case(tmp_path_factory):
  """The full-size real BraTS-space case (../shared) in a BraTS 2020 layout."""
  require_shared(REAL_SAMPLE, "the full-size real case (shape, voxel counts)")
  return _as_brats_2020(REAL_SAMPLE, tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def real_fixture_case(tmp_path_factory):
  """The repo's small derivative of the real case (tests/data, 3 mm voxels)."""
  return _as_brats_2020(REAL_FIXTURE, tmp_path_factory.mktemp("real_fixture"))


def test_real_case_loads_and_keeps_negative_brain_voxels(real_case):
  vols = volumes.load_case(real_case, T2)
  t2 = vols.images["t2"]
  assert t2.shape == (240, 240, 155)
  assert t2.min() < 0  # interpolation leaves negative values in the brain.
  assert np.count_nonzero(vols.brain) == np.count_nonzero(t2 != 0)
  assert np.count_nonzero(vols.brain) > np.count_nonzero(t2 > 0)
  assert np.count_nonzero(vols.labels) == 24188
  assert set(np.unique(vols.labels)) == {0, 1, 2}


def test_real_fixture_keeps_the_real_values(real_fixture_case):
  vols = volumes.load_case(real_fixture_case, T2)
  t2 = vols.images["t2"]
  assert t2.shape == (45, 56, 46)  # tests/data/README.md.
  assert t2.min() < 0  # the real case's negative brain voxels survive.
  assert np.count_nonzero(vols.brain) == np.count_nonzero(t2 != 0)
  assert set(np.unique(vols.labels)) == {0, 1, 2}


def test_real_case_slices(real_fixture_case, tiny_data_cfg):
  cfg = dict(tiny_data_cfg, image_size=128)
  arrays, meta = case_slices.extract(real_fixture_case, cfg)
  assert 1 <= meta["num_tumor_slices"] <= 5
  assert meta["num_healthy_slices"] >= 1
  assert all(z % 2 == 0 for z in arrays["tumor_z"])  # 5 mm of 3 mm voxels.
  image = arrays["tumor_image"]
  assert image.shape[1:] == (128, 128, 1)
  assert image.min() >= -1.0 - 1e-6 and image.max() <= 1.0 + 1e-6
  assert np.all(arrays["tumor_label"].reshape(len(image), -1).max(1) > 0)
  assert np.all(arrays["healthy_label"] == 0)
  # Background stays exactly -1 after resizing; the brain is mostly above it.
  assert np.all(image[:, :4, :4] == -1.0)  # corners are background.
  brain = arrays["tumor_brain"].astype(bool)
  assert np.mean(image[..., 0][brain] > -0.99) > 0.95


def _shifted_copy(case, root, shift, dtype=None):
  """`case` copied into a 2020 layout under `root`, its images + `shift` everywhere."""
  import nibabel as nib
  folder = root / "BraTS20_Training_042"
  folder.mkdir(parents=True)
  for m in brats.MODALITIES + ("seg",):
    img = nib.load(case.files[m])
    data = np.asarray(img.dataobj)
    if m != "seg":
      data = (data.astype(np.float64) + shift).astype(dtype or data.dtype)
    write_nifti(str(folder / f"BraTS20_Training_042_{m}.nii.gz"), data, img.affine)
  return brats.discover_cases(str(root))[0]


@pytest.mark.parametrize("shift,dtype", [(-600, np.int16), (100, np.int16),
                                         (0.25, np.float32)])
def test_a_constant_offset_leaves_brain_and_slices_unchanged(
    real_fixture_case, tiny_data_cfg, tmp_path, shift, dtype):
  # The real case with every voxel shifted (background -600, 100 or 0.25):
  # read as "every non-zero voxel", the whole volume was brain, and the
  # healthy selection took the empty caps for brain (32 slices, not 24).
  shifted = _shifted_copy(real_fixture_case, tmp_path, shift, dtype)
  plain, moved = volumes.load_case(real_fixture_case, T2), volumes.load_case(shifted, T2)
  assert volumes.background_value(moved.images["t2"]) == pytest.approx(shift)
  np.testing.assert_array_equal(moved.brain, plain.brain)
  cfg = dict(tiny_data_cfg, image_size=64)
  (a, meta_a), (b, meta_b) = (case_slices.extract(c, cfg) for c in
                              (real_fixture_case, shifted))
  assert meta_b["num_healthy_slices"] == meta_a["num_healthy_slices"]
  assert meta_b["brain_voxels"] == meta_a["brain_voxels"]
  for key in ("tumor_z", "healthy_z", "tumor_brain", "healthy_brain"):
    np.testing.assert_array_equal(b[key], a[key])
  # Normalisation is per-volume percentiles: a shift does not change the images.
  np.testing.assert_allclose(b["tumor_image"], a["tumor_image"], atol=1e-4)


def test_background_value_is_zero_without_a_constant_face():
  rng = np.random.default_rng(0)
  assert volumes.background_value(rng.normal(size=(8, 9, 10))) == 0.0
  vol = np.zeros((8, 9, 10), np.float32)
  vol[2:6, 2:7, 2:8] = 5.0
  assert volumes.background_value(vol) == 0.0
  assert volumes.background_value(vol - 3.0) == -3.0


def test_a_constant_volume_is_an_empty_brain(tmp_path):
  case = _case(tmp_path)
  write_nifti(case.files["t2"], np.full((24, 24, 20), 7, np.int16))
  with pytest.raises(brats.BratsDataError, match="every voxel holds one value") as e:
    volumes.load_case(case, T2)
  assert e.value.path == case.files["t2"]
