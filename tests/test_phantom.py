"""Tests of the BraTS-format phantom generator (BRATS_FORMAT.md section 6)."""

import csv
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_pipeline import brats
from data_pipeline import phantom
from data_pipeline import tumor_contrast
from data_pipeline import volumes
from tests.conftest import REAL_SAMPLE, require_shared

SCALE = 0.4  # 96 x 96 x 62 voxels of 2.5 mm: fast, still anatomical.
SEG_VALUES = {"2018": {0, 1, 2, 4}, "2019": {0, 1, 2, 4}, "2020": {0, 1, 2, 4},
              "2021": {0, 1, 2, 4}, "2023": {0, 1, 2, 3}}
ET_LABEL = {"2018": 4, "2019": 4, "2020": 4, "2021": 4, "2023": 3}


def load(path):
  return np.asarray(nib.load(path).dataobj)


def case_folder(info, case):
  """2018 / 2019 cases sit in the releases' HGG/ and LGG/ folders."""
  if info.version in brats.SITE_IN_ID_VERSIONS:
    return os.path.join(info.data_dir, case.grade, case.case_id)
  return os.path.join(info.data_dir, case.case_id)


def case_volumes(info, case_id):
  case = {c.case_id: c for c in info.cases}[case_id]
  folder = case_folder(info, case)
  files = brats.case_files(info.version, case_id, folder)
  return {name: load(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def ph2020(tmp_path_factory):
  return phantom.generate(str(tmp_path_factory.mktemp("p2020")), version="2020",
                          num_cases=8, seed=0, scale=SCALE)


@pytest.fixture(scope="module")
def volumes2020(ph2020):
  return {c.case_id: case_volumes(ph2020, c.case_id) for c in ph2020.cases}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
  # Two cases: pick 0 (medium tumor) and pick 1 (the large border tumor).
  return phantom.generate(str(tmp_path_factory.mktemp("full")), version="2020",
                          num_cases=2, seed=0)


@pytest.mark.parametrize("version", brats.VERSIONS)
def test_file_names_per_version(tmp_path, version):
  info = phantom.generate(str(tmp_path), version=version, num_cases=2, scale=SCALE)
  assert info.data_dir == os.path.join(str(tmp_path), brats.DATA_FOLDER_NAMES[version])
  subdirs = sorted(d for d in os.listdir(info.data_dir)
                   if os.path.isdir(os.path.join(info.data_dir, d)))
  if version in brats.SITE_IN_ID_VERSIONS:
    assert set(subdirs) <= set(brats.GRADE_FOLDERS)
    subdirs = sorted(c for g in subdirs for c in os.listdir(os.path.join(info.data_dir, g)))
  assert subdirs == info.case_ids
  pattern = brats.CASE_PATTERNS[version]
  for case in info.cases:
    assert pattern.match(case.case_id)
    names = sorted(os.listdir(case_folder(info, case)))
    expected = sorted(brats.file_stem(version, case.case_id, m) + ".nii.gz"
                      for m in brats.MODALITIES + ("seg",))
    assert names == expected
    volumes = case_volumes(info, case.case_id)
    assert set(np.unique(volumes["seg"])) <= SEG_VALUES[version]
  if version == "2023":
    assert any(n.endswith("-t2f.nii.gz") for n in names)
    assert all(c.center == "BraTS2023" for c in info.cases)
  if version in brats.SITE_IN_ID_VERSIONS:  # the center and grade are the site's.
    assert [(c.center, c.grade) for c in info.cases] == [
        (brats.site_to_center(info.sites[c.case_id]), c.grade) for c in info.cases]
    assert all(c.case_id.split("_")[1] == info.sites[c.case_id] for c in info.cases)
  csvs = {n for n in os.listdir(info.data_dir) if n.endswith(".csv")}
  assert csvs == ({brats.NAME_MAPPING_FILE, brats.SURVIVAL_FILE}
                  if version == "2020" else set())
  found = brats.discover_cases(str(tmp_path))
  assert [c.case_id for c in found] == info.case_ids
  assert [(c.center, c.grade) for c in found] == [(c.center, c.grade) for c in info.cases]


def test_uncompressed_kaggle_nesting_and_quirk_355(tmp_path):
  info = phantom.generate(str(tmp_path), num_cases=3, compressed=False,
                          kaggle_nesting=True, quirk_355=True, scale=SCALE)
  assert info.data_dir == os.path.join(str(tmp_path), brats.KAGGLE_OUTER_FOLDER,
                                       brats.DATA_FOLDER_NAMES["2020"])
  assert "BraTS20_Training_355" in info.case_ids
  for case in info.cases:
    names = os.listdir(os.path.join(info.data_dir, case.case_id))
    assert len(names) == 5 and all(n.endswith(".nii") for n in names)
  quirk = os.listdir(os.path.join(info.data_dir, "BraTS20_Training_355"))
  assert brats.QUIRK_355_SEG_STEM + ".nii" in quirk
  assert "BraTS20_Training_355_seg.nii" not in quirk
  cases = brats.discover_cases(str(tmp_path))
  assert [c.case_id for c in cases] == info.case_ids
  assert all(set(c.files) == set(brats.MODALITIES) | {"seg"} for c in cases)
  with pytest.raises(ValueError):
    phantom.generate(str(tmp_path), version="2021", kaggle_nesting=True)


def test_full_size_geometry_and_headers(full_size):
  case_id = full_size.cases[0].case_id
  folder = os.path.join(full_size.data_dir, case_id)
  for name, path in brats.case_files("2020", case_id, folder).items():
    image = nib.load(path)
    header = image.header
    assert isinstance(image, nib.Nifti1Image) and header["magic"] == b"n+1"
    assert image.shape == (240, 240, 155)
    np.testing.assert_array_equal(image.affine, phantom.BRATS_AFFINE)
    np.testing.assert_array_equal(header.get_qform(), phantom.BRATS_AFFINE)
    np.testing.assert_array_equal(header.get_sform(), phantom.BRATS_AFFINE)
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    assert header.get_zooms() == (1.0, 1.0, 1.0)
    assert int(header["xyzt_units"]) == 2  # mm, like the real files.
    assert header.get_data_dtype() == (np.uint8 if name == "seg" else np.int16)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
  volumes = case_volumes(full_size, case_id)
  brain = volumes["t1"] > 0
  lo, hi = np.argwhere(brain).min(0), np.argwhere(brain).max(0)
  for got, want in zip(np.stack([lo, hi], 1), phantom.BRAIN_BOX):
    assert abs(got[0] - want[0]) <= 8 and abs(got[1] - want[1]) <= 8, (lo, hi)
  assert 1.4e6 < brain.sum() < 1.9e6
  # Orientation: the lowest brain slices (cerebellum) lie posterior (large y).
  idx = np.argwhere(brain)
  low = idx[idx[:, 2] < lo[2] + 20]
  assert low[:, 1].mean() > idx[:, 1].mean() + 15


def test_full_size_tumors(full_size):
  for case in full_size.cases:
    volumes = case_volumes(full_size, case.case_id)
    seg, brain = volumes["seg"], volumes["t1"] > 0
    assert np.count_nonzero(seg) == case.tumor_voxels
    assert not np.any((seg > 0) & ~brain)
    z_brain = brain.any(axis=(0, 1))
    z_tumor = (seg > 0).any(axis=(0, 1))
    assert np.sum(z_brain & ~z_tumor) >= 30
  # The second pick is the large tumor near the superior border.
  large_id = brats.case_id_for("2020", phantom.select_case_numbers("2020", 2)[1])
  large = full_size.cases[full_size.case_ids.index(large_id)]
  assert large.tumor_voxels > 80_000
  volumes = case_volumes(full_size, large_id)
  top_brain = np.nonzero(volumes["t1"].any(axis=(0, 1)))[0].max()
  assert np.nonzero((volumes["seg"] > 0).any(axis=(0, 1)))[0].max() >= top_brain - 15


def test_masks_background_and_containment(ph2020, volumes2020):
  for case_id, vol in volumes2020.items():
    masks = [vol[m] != 0 for m in brats.MODALITIES]
    for m in brats.MODALITIES:
      assert vol[m].dtype == np.int16 and vol[m].min() >= 0
    for mask in masks[1:]:
      np.testing.assert_array_equal(mask, masks[0])
    brain = masks[0]
    np.testing.assert_array_equal(ndimage.binary_fill_holes(brain), brain)
    seg = vol["seg"]
    assert seg.dtype == np.uint8
    assert set(np.unique(seg)) <= SEG_VALUES["2020"]
    assert not np.any((seg > 0) & ~brain), case_id
    assert np.count_nonzero(seg) == {c.case_id: c.tumor_voxels
                                     for c in ph2020.cases}[case_id]


def test_label_nesting(volumes2020):
  for case_id, vol in volumes2020.items():
    seg = vol["seg"]
    wt = seg > 0
    if not wt.any():
      continue
    boundary = wt & ~ndimage.binary_erosion(wt)
    assert np.mean(seg[boundary] == 2) > 0.9, case_id  # Edema outermost.
    core = (seg == 1) | (seg == 4)
    assert not np.any(core & boundary), case_id
    if np.any(seg == 4):  # ET surrounds the necrosis.
      ncr = seg == 1
      assert not np.any(ncr & ~ndimage.binary_erosion(core)), case_id


def test_tumor_free_slices(volumes2020):
  for case_id, vol in volumes2020.items():
    brain_z = (vol["t1"] > 0).any(axis=(0, 1))
    tumor_z = (vol["seg"] > 0).any(axis=(0, 1))
    # >= 30 mm of tumor-free brain (= 30 slices at full size).
    assert np.sum(brain_z & ~tumor_z) >= np.ceil(30 * SCALE), case_id


def test_tumor_variety(ph2020, volumes2020):
  voxel_mm3 = (1 / SCALE) ** 3
  no_et = [cid for cid, v in volumes2020.items() if not np.any(v["seg"] == 4)]
  assert no_et
  assert any(np.any(v["seg"] == 4) for v in volumes2020.values())
  sizes = [c.tumor_voxels * voxel_mm3 for c in ph2020.cases]
  assert max(sizes) > 80_000 and max(sizes) / max(min(sizes), 1) > 5
  assert sum(10_000 <= s <= 200_000 for s in sizes) >= 5
  lgg = [c.case_id for c in ph2020.cases if c.grade == "LGG"]
  assert lgg and all(not np.any(volumes2020[cid]["seg"] == 4) for cid in lgg)


def _canonical(vol, version="2020"):
  return volumes.canonical_labels("seg", vol["seg"], version)


@pytest.fixture(scope="module")
def real_sample():
  """The real BraTS case's four modalities and canonical labels.

  The full-size case: the documented ratios and fractions were measured on it
  (the small fixture in tests/data measures differently).
  """
  require_shared(REAL_SAMPLE, "the full-size real case the phantom's tumor "
                 "contrasts were measured on")
  vol = {m: load(os.path.join(REAL_SAMPLE, f"TCGA-DU-7294_{m}.nii.gz"))
         for m in brats.MODALITIES + ("seg",)}
  return {m: vol[m] for m in brats.MODALITIES}, _canonical(vol)


def test_real_sample_measures_as_documented(real_sample):
  # The table the phantom's contrasts and ranges come from is what the same
  # measuring function gives on the real case, and the real case lies in
  # every accepted range.
  images, labels = real_sample
  ratios = tumor_contrast.contrast_ratios(images, labels)
  assert ratios.keys() == tumor_contrast.REAL_SAMPLE_RATIOS.keys()
  for modality, table in tumor_contrast.REAL_SAMPLE_RATIOS.items():
    assert ratios[modality].keys() == table.keys()  # no ET in this case.
    for region, want in table.items():
      assert ratios[modality][region] == pytest.approx(want, abs=0.006)
      low, high = tumor_contrast.RATIO_RANGES[modality][region]
      assert low < ratios[modality][region] < high, (modality, region)
  fractions = tumor_contrast.tumor_fractions(tumor_contrast.brain_mask(images),
                                             labels)
  for name, want in tumor_contrast.REAL_SAMPLE_FRACTIONS.items():
    assert fractions[name] == pytest.approx(want, abs=0.006)
  low, high = tumor_contrast.WT_FRACTION_RANGE
  assert low < fractions["wt"] < high
  assert 1.17 <= ratios["t2"]["wt"] <= 1.5  # hyperintense on T2.


def test_tumor_contrasts_follow_real_brats(ph2020, volumes2020):
  grade = {c.case_id: c.grade for c in ph2020.cases}
  for case_id, vol in volumes2020.items():
    images = {m: vol[m] for m in brats.MODALITIES}
    ratios = tumor_contrast.contrast_ratios(images, _canonical(vol))
    with_et = grade[case_id] == "HGG"
    want = {"ncr", "ed", "wt"} | ({"et"} if with_et else set())
    for modality, table in ratios.items():
      assert set(table) == want, (case_id, modality)
      for region, ratio in table.items():
        low, high = tumor_contrast.RATIO_RANGES[modality][region]
        assert low < ratio < high, (case_id, modality, region, ratio)
    # What the eleven real BraTS 2018 cases show (tumor_contrast's
    # docstring): bright on T2 and FLAIR; label 1 brighter than edema on
    # T2, darker on T1 and T1ce; the enhancing rim the brightest on T1ce.
    assert ratios["t2"]["wt"] > 1.1 and ratios["flair"]["wt"] > 1.3, case_id
    assert ratios["t1"]["ncr"] < ratios["t1"]["ed"], case_id
    assert ratios["t2"]["ncr"] > ratios["t2"]["ed"], case_id
    if with_et:
      assert ratios["t1ce"]["et"] > ratios["t1ce"]["ed"] > ratios["t1ce"]["ncr"]


def test_tumor_sizes_follow_real_brats(ph2020, volumes2020):
  grade = {c.case_id: c.grade for c in ph2020.cases}
  wt = {}
  for case_id, vol in volumes2020.items():
    brain = vol["t1"] > 0
    fractions = tumor_contrast.tumor_fractions(brain, _canonical(vol))
    wt[case_id] = fractions["wt"]
    low, high = tumor_contrast.WT_FRACTION_RANGE
    assert low < fractions["wt"] < high, (case_id, fractions)
    low, high = tumor_contrast.SHARE_RANGES["ed"]
    assert low < fractions["ed"] < high, (case_id, fractions)
    if grade[case_id] == "HGG":
      for name in ("et", "ncr"):
        low, high = tumor_contrast.SHARE_RANGES[name]
        assert low < fractions[name] < high, (case_id, name, fractions)
    else:  # non-enhancing tumor of a low-grade glioma (the real one: 38 %).
      assert fractions["et"] == 0 and 0.1 < fractions["ncr"] < 0.5, case_id
  # Small to large like the real cases (2-16 %, median 8.5 %): the small
  # pick under 3.5 %, the large one over 11 %.
  picks = phantom.select_case_numbers("2020", len(ph2020.cases))
  large, small = (brats.case_id_for("2020", picks[i]) for i in (1, 3))
  assert wt[small] < 0.035 and wt[large] > 0.11
  assert 0.05 < np.median(list(wt.values())) < 0.12


def _regions(maps, seg):
  tumor = ndimage.binary_dilation(seg > 0, iterations=3)
  inner = ndimage.binary_erosion(maps.brain, iterations=2)
  return {"csf": (maps.csf > 0.8) & inner & ~tumor,
          "gm": (maps.gm > 0.7) & inner & ~tumor,
          "wm": (maps.wm > 0.9) & inner & ~tumor}


def test_tissue_contrast(volumes2020):
  maps = phantom.tissue_maps(SCALE)
  for case_id, vol in volumes2020.items():
    regions = _regions(maps, vol["seg"])
    mean = {(m, r): float(vol[m][mask].mean())
            for m in brats.MODALITIES for r, mask in regions.items()}
    assert mean["t2", "csf"] > mean["t2", "gm"] > mean["t2", "wm"], case_id
    assert mean["t1", "wm"] > mean["t1", "gm"] > mean["t1", "csf"], case_id
    assert mean["flair", "csf"] < mean["flair", "wm"], case_id
    # T1ce's WM mean is 2.85x T1's before each modality's own bias field.
    assert mean["t1ce", "wm"] > 2.0 * mean["t1", "wm"], case_id
    # Tumor appearance relative to white matter (the real cases' enhancing
    # rim: about 1.4x the healthy brain's median on T1ce, and WM, the
    # brightest tissue there, lies above that median).
    seg = vol["seg"]
    for label, modality, low, high in ((2, "t2", 1.4, 3.0), (2, "flair", 1.5, 3.5),
                                       (4, "t1ce", 1.1, 2.5), (1, "t1ce", 0.1, 0.8)):
      core = ndimage.binary_erosion(seg == label)
      if core.sum() >= 5:
        ratio = vol[modality][core].mean() / mean[modality, "wm"]
        assert low < ratio < high, (case_id, label, modality, ratio)


def test_center_intensity_scale(ph2020, volumes2020):
  maps = phantom.tissue_maps(SCALE)
  wm_t1 = {}
  for case in ph2020.cases:
    vol = volumes2020[case.case_id]
    wm = _regions(maps, vol["seg"])["wm"]
    wm_t1.setdefault(case.center, []).append(float(np.median(vol["t1"][wm])))
  per_center = {c: np.mean(v) for c, v in wm_t1.items()}
  assert len(per_center) == 5
  assert max(per_center.values()) / min(per_center.values()) > 2.5
  assert per_center["CBICA"] / per_center["TCIA"] > 1.3


def read_csv_rows(path):
  with open(path, "rb") as f:
    raw = f.read()
  assert b"\r" not in raw
  return list(csv.reader(raw.decode().splitlines()))


def test_name_mapping_and_survival(ph2020):
  rows = read_csv_rows(os.path.join(ph2020.data_dir, brats.NAME_MAPPING_FILE))
  assert tuple(rows[0]) == brats.NAME_MAPPING_HEADER
  body = rows[1:]
  ids = [r[5] for r in body]
  assert ids == sorted(ids) == ph2020.case_ids  # 1:1 with the folders.
  for row in body:
    assert all(row), row  # Missing values are the literal NA.
    case_id = row[5]
    site = row[4].split("_")[1] if row[4] != "NA" else "NA"
    assert site == ph2020.sites[case_id]
    number = brats.case_number("2020", case_id)
    assert (site, row[0]) == phantom.site_of_number(number)
  mapping = brats.read_name_mapping(os.path.join(ph2020.data_dir,
                                                 brats.NAME_MAPPING_FILE))
  discovered = {c.case_id: c.center for c in brats.discover_cases(ph2020.data_dir)}
  assert discovered == ph2020.center_of_case
  for case in ph2020.cases:
    if case.case_id in mapping:
      assert mapping[case.case_id] == (case.center, case.grade)
  survival = read_csv_rows(os.path.join(ph2020.data_dir, brats.SURVIVAL_FILE))
  assert tuple(survival[0]) == brats.SURVIVAL_HEADER
  hgg = [c.case_id for c in ph2020.cases if c.grade == "HGG"]
  assert [r[0] for r in survival[1:]] == hgg
  for row in survival[1:]:
    assert re.fullmatch(r"\d+\.\d{3}", row[1])
    assert row[3] in ("GTR", "STR", "NA")
  assert any(not r[2].isdigit() for r in survival[1:])


def test_full_mapping_counts(tmp_path):
  info = phantom.generate(str(tmp_path), num_cases=1, scale=SCALE, full_mapping=True)
  rows = read_csv_rows(os.path.join(info.data_dir, brats.NAME_MAPPING_FILE))[1:]
  assert [r[5] for r in rows] == [brats.case_id_for("2020", n) for n in range(1, 370)]
  sites = [re.sub(r"\d+$", "", r[4].split("_")[1]) or r[4].split("_")[1]
           if r[4] != "NA" else "NA" for r in rows]
  counts = {s: sites.count(s) for s in set(sites)}
  assert counts == {"CBICA": 129, "TCIA": 167, "2013": 30, "TMC": 9, "NA": 34}
  assert sum(r[0] == "HGG" for r in rows) == 293
  assert sum(r[0] == "LGG" for r in rows) == 76
  assert len({r[4] for r in rows if r[4] != "NA"}) == 335
  for row in rows:
    site = row[4].split("_")[1] if row[4] != "NA" else "NA"
    if site.startswith("TCIA"):
      local = row[4].split("_")[2]
      assert row[1] == f"Brats17_TCIA_{local}_1"
      assert row[2] == f"Brats18_{site}_{local}_1"
      assert re.fullmatch(rf"TCGA-{phantom.TCGA_PREFIX[site]}-\d{{4}}", row[3])
    elif site == "CBICA":
      assert re.fullmatch(r"Brats17_CBICA_[A-Z]{3}_1", row[1]) and row[3] == "NA"
    elif site == "TMC":
      assert row[1:4] == ["NA"] * 3 and re.fullmatch(r"BraTS19_TMC_\d{5}_1", row[4])
    elif site == "NA":
      assert row[:5] == ["HGG", "NA", "NA", "NA", "NA"]
  mapping = brats.read_name_mapping(os.path.join(info.data_dir,
                                                 brats.NAME_MAPPING_FILE))
  centers = [center for center, _ in mapping.values()]
  assert centers.count("CBICA") == 129 and centers.count("TCIA") == 167


def test_case_selection():
  numbers = phantom.select_case_numbers("2020", 8)
  centers = [phantom.center_of_number("2020", n) for n in numbers]
  assert set(centers) == {"CBICA", "TCIA", "2013", "TMC", "BraTS2020"}
  assert any(phantom.site_of_number(n)[1] == "LGG" for n in numbers)
  many = phantom.select_case_numbers("2020", 100)
  assert len(set(many)) == 100
  centers = [phantom.center_of_number("2020", n) for n in many]
  assert 0.35 <= centers.count("CBICA") / 100 <= 0.45
  assert 0.35 <= centers.count("TCIA") / 100 <= 0.45
  assert sorted(phantom.select_case_numbers("2020", 369)) == list(range(1, 370))
  assert 355 in phantom.select_case_numbers("2020", 2, quirk_355=True)
  ids_2021 = phantom.select_case_numbers("2021", 20)
  assert len(set(ids_2021)) == 20 and max(ids_2021) <= 1666


def test_case_selection_2018_2019_keeps_to_each_release():
  # 2019 has every BraTS20 row but the 34 new ones; 2018 has no TMC either.
  assert sorted(phantom.select_case_numbers("2019", 335)) == list(range(1, 336))
  all_2018 = phantom.select_case_numbers("2018", 326)
  assert sorted(all_2018) == [n for n in range(1, 336)
                              if phantom.site_of_number(n)[0] != "TMC"]
  with pytest.raises(ValueError, match="<= 326"):
    phantom.select_case_numbers("2018", 327)
  first = phantom.select_case_numbers("2018", 8)
  assert {phantom.center_of_number("2018", n) for n in first} == {"CBICA", "TCIA", "2013"}
  assert phantom.case_id_of("2018", 158) == phantom.mapping_rows()[157][2]
  assert phantom.case_id_of("2019", 270).startswith("BraTS19_TMC_")
  with pytest.raises(ValueError, match="no BraTS 2018 id"):
    phantom.case_id_of("2018", 270)


def test_determinism(tmp_path, ph2020, volumes2020):
  same = phantom.generate(str(tmp_path / "same"), num_cases=2, seed=0, scale=SCALE)
  other = phantom.generate(str(tmp_path / "other"), num_cases=2, seed=1, scale=SCALE)
  assert same.case_ids == other.case_ids
  for case_id in same.case_ids:
    # A case does not depend on how many cases were generated with it.
    a, b = case_volumes(same, case_id), volumes2020[case_id]
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
      assert a[name].dtype == b[name].dtype
    c = case_volumes(other, case_id)
    assert not np.array_equal(a["t1"], c["t1"])
    assert not np.array_equal(a["seg"], c["seg"])
    stem = brats.file_stem("2020", case_id, "t2") + ".nii.gz"
    with open(os.path.join(same.data_dir, case_id, stem), "rb") as f1, \
        open(os.path.join(ph2020.data_dir, case_id, stem), "rb") as f2:
      assert f1.read() == f2.read()


def test_parallel_matches_serial(tmp_path, volumes2020):
  info = phantom.generate(str(tmp_path), num_cases=3, seed=0, scale=SCALE,
                          num_workers=2)
  for case_id in info.case_ids:
    vol = case_volumes(info, case_id)
    for name in vol:
      np.testing.assert_array_equal(vol[name], volumes2020[case_id][name])


def _case_folders(data_dir):
  """The data folder's entries but the phantom's marker (which it must hold)."""
  names = os.listdir(data_dir)
  assert brats.PHANTOM_MARKER in names
  return [n for n in names if n != brats.PHANTOM_MARKER]


def test_cli(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "launch.make_phantom", f"--out_dir={tmp_path}",
       "--version=2023", "--num_cases=1", "--scale=0.3", "--nocompressed"],
      cwd=repo, capture_output=True, text=True, check=True)
  data_dir = result.stdout.strip().splitlines()[-1]
  assert data_dir == os.path.join(str(tmp_path), brats.DATA_FOLDER_NAMES["2023"])
  (case_id,) = _case_folders(data_dir)
  assert sorted(os.listdir(os.path.join(data_dir, case_id))) == sorted(
      f"{case_id}-{s}.nii" for s in ("t1n", "t1c", "t2w", "t2f", "seg"))


def test_stage_run_reuses_refuses_and_overwrites(tmp_path):
  from dfgm_jax import errors
  out = str(tmp_path / "phantom")
  params = {"version": "2023", "num_cases": 1, "seed": 0, "scale": 0.3}
  data_dir = phantom.run(params, out)
  assert data_dir == os.path.join(out, brats.DATA_FOLDER_NAMES["2023"])
  assert sorted(os.listdir(out)) == [brats.DATA_FOLDER_NAMES["2023"],
                                     phantom.DONE_FILE]  # .build is gone.
  (case_id,) = _case_folders(data_dir)
  seg = os.path.join(data_dir, case_id, f"{case_id}-seg.nii.gz")
  stamp = os.path.getmtime(seg)
  # Same parameters (defaults spelt out or not): reused, nothing rewritten.
  assert phantom.run(dict(params, compressed=True), out) == data_dir
  assert os.path.getmtime(seg) == stamp
  # Other parameters on a finished folder: refused, naming what differs.
  with pytest.raises(errors.RunMismatch, match="num_cases: 1 -> 2"):
    phantom.run(dict(params, num_cases=2), out)
  assert phantom.run(dict(params, num_cases=2), out, overwrite=True) == data_dir
  assert len(_case_folders(data_dir)) == 2
  # Another layout replaces the old one rather than sitting beside it.
  data_2021 = phantom.run(dict(params, version="2021"), out, overwrite=True)
  assert sorted(os.listdir(out)) == [brats.DATA_FOLDER_NAMES["2021"],
                                     phantom.DONE_FILE]
  assert len(_case_folders(data_2021)) == 1
  # The record of the pipeline's earlier stage ({params, data_dir}) is honoured.
  with open(os.path.join(out, phantom.DONE_FILE), "w") as f:
    f.write('{"params": {"version": "2021", "num_cases": 1, "seed": 0, '
            f'"scale": 0.3}}, "data_dir": "{data_2021}"}}')
  stamp = os.path.getmtime(data_2021)
  assert phantom.run(dict(params, version="2021"), out) == data_2021
  assert os.path.getmtime(data_2021) == stamp


@pytest.mark.parametrize("params,says", [
    ({"num_cases": 0}, "config.phantom.num_cases=0: must be a positive integer"),
    ({"scale": 1.5}, "config.phantom.scale=1.5: must be in (0, 1]"),
    ({"version": "2017"}, "config.phantom.version='2017': must be one of"),
    ({"cases": 3}, "config.phantom.cases=3: not a phantom parameter"),
    ({"version": "2021", "quirk_355": True}, "config.phantom.quirk_355=True: 2020 only"),
])
def test_stage_run_refuses_bad_parameters_before_writing(tmp_path, params, says):
  from dfgm_jax import errors
  with pytest.raises(errors.ConfigError) as e:
    phantom.run(params, str(tmp_path / "phantom"))
  assert says in str(e.value)
  assert not (tmp_path / "phantom").exists()
