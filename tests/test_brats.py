"""Layouts, versions, file names, quirks and centers (data_pipeline/brats.py)."""

import os

import pytest

from data_pipeline import brats
from tests.conftest import make_case


@pytest.mark.parametrize("version", brats.VERSIONS)
def test_finds_cases_of_each_version(tmp_path, version):
  root = tmp_path / brats.DATA_FOLDER_NAMES[version]
  for n in (1, 7):
    make_case(str(root), version, n)
  cases = brats.discover_cases(str(tmp_path))
  assert [c.case_id for c in cases] == [brats.case_id_for(version, n) for n in (1, 7)]
  assert all(c.version == version for c in cases)
  assert set(cases[0].files) == set(brats.MODALITIES) | {"seg"}
  want = "CBICA" if version in brats.SITE_IN_ID_VERSIONS else f"BraTS{version}"
  assert all(c.center == want for c in cases)


@pytest.mark.parametrize("version", brats.SITE_IN_ID_VERSIONS)
def test_2018_2019_ids_name_the_site_and_grade_folders_the_grade(tmp_path, version):
  # The official releases: <data folder>/{HGG,LGG}/<id>/<id>_<modality>.nii.gz.
  root = tmp_path / brats.DATA_FOLDER_NAMES[version]
  made = [make_case(str(root / "HGG"), version, 1, site="CBICA"),
          make_case(str(root / "HGG"), version, 425, site="TCIA01"),
          make_case(str(root / "LGG"), version, 101, site="TCIA09"),
          make_case(str(root / "HGG"), version, 2, site="2013"),
          make_case(str(root / "LGG"), version, 9043, site="TMC")]
  prefix = "Brats18" if version == "2018" else "BraTS19"
  assert [c for c, _ in made] == [f"{prefix}_CBICA_AAB_1", f"{prefix}_TCIA01_425_1",
                                  f"{prefix}_TCIA09_101_1", f"{prefix}_2013_2_1",
                                  f"{prefix}_TMC_09043_1"]
  assert sorted(os.listdir(made[0][1])) == sorted(
      f"{prefix}_CBICA_AAB_1_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
  cases = {c.case_id: c for c in brats.discover_cases(str(tmp_path))}
  assert {i: (c.center, c.grade) for i, c in cases.items()} == {
      f"{prefix}_CBICA_AAB_1": ("CBICA", "HGG"),
      f"{prefix}_TCIA01_425_1": ("TCIA", "HGG"),
      f"{prefix}_TCIA09_101_1": ("TCIA", "LGG"),
      f"{prefix}_2013_2_1": ("2013", "HGG"),
      f"{prefix}_TMC_09043_1": ("TMC", "LGG")}
  assert all(set(c.files) == set(brats.MODALITIES) | {"seg"} for c in cases.values())
  # Sites kept apart (config.data.merge_site_numbers=False).
  apart = {c.case_id: c.center for c in
           brats.discover_cases(str(tmp_path), merge_site_numbers=False)}
  assert apart[f"{prefix}_TCIA01_425_1"] == "TCIA01"
  assert apart[f"{prefix}_TCIA09_101_1"] == "TCIA09"
  assert apart[f"{prefix}_CBICA_AAB_1"] == "CBICA"
  assert brats.site_of_case_id(version, f"{prefix}_TCIA09_101_1") == "TCIA09"
  with pytest.raises(ValueError, match="site"):
    brats.case_number(version, f"{prefix}_TCIA09_101_1")


def test_2018_flat_layout_and_validation_cases_without_seg(tmp_path):
  # The real 11-case folder is flat (no HGG/LGG); validation cases have no seg.
  make_case(str(tmp_path), "2018", 1, site="CBICA")
  _, folder = make_case(str(tmp_path), "2018", 628, site="TCIA10", with_seg=False)
  cases = {c.case_id: c for c in brats.discover_cases(str(tmp_path))}
  assert cases["Brats18_CBICA_AAB_1"].grade == ""
  assert cases["Brats18_TCIA10_628_1"].center == "TCIA"
  assert "seg" not in cases["Brats18_TCIA10_628_1"].files
  assert set(cases["Brats18_TCIA10_628_1"].files) == set(brats.MODALITIES)
  # A 2018 and a 2019 folder side by side are two data sets.
  make_case(str(tmp_path / "other"), "2019", 1)
  with pytest.raises(brats.BratsDataError, match="mixes BraTS versions"):
    brats.discover_cases(str(tmp_path))


def test_2023_file_names_use_new_suffixes(tmp_path):
  _, folder = make_case(str(tmp_path), "2023", 5)
  names = sorted(os.listdir(folder))
  assert names == sorted(f"BraTS-GLI-00005-000-{m}.nii.gz"
                         for m in ("t1n", "t1c", "t2w", "t2f", "seg"))
  case = brats.discover_cases(str(tmp_path))[0]
  assert case.files["t2"].endswith("BraTS-GLI-00005-000-t2w.nii.gz")


def test_kaggle_double_nesting_and_plain_nii(tmp_path):
  root = tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
  make_case(str(root), "2020", 3, ext=".nii")
  case = brats.discover_cases(str(tmp_path))[0]
  assert case.case_id == "BraTS20_Training_003"
  assert case.files["seg"].endswith("BraTS20_Training_003_seg.nii")


def test_seg_quirk_of_case_355(tmp_path):
  _, folder = make_case(str(tmp_path), "2020", 355, ext=".nii")
  os.rename(os.path.join(folder, "BraTS20_Training_355_seg.nii"),
            os.path.join(folder, "W39_1998.09.19_Segm.nii"))
  case = brats.discover_cases(str(tmp_path))[0]
  assert os.path.basename(case.files["seg"]) == "W39_1998.09.19_Segm.nii"


def test_missing_seg_is_absent_not_guessed_when_ambiguous(tmp_path):
  _, folder = make_case(str(tmp_path), "2020", 1)
  os.remove(os.path.join(folder, "BraTS20_Training_001_seg.nii.gz"))
  case = brats.discover_cases(str(tmp_path))[0]
  assert "seg" not in case.files


def test_folder_that_is_not_brats_names_the_folder(tmp_path):
  (tmp_path / "patient_a").mkdir()
  (tmp_path / "patient_a" / "scan.nii.gz").write_bytes(b"x")
  with pytest.raises(brats.BratsDataError, match="no BraTS case folders") as e:
    brats.discover_cases(str(tmp_path))
  assert e.value.path == str(tmp_path)
  with pytest.raises(brats.BratsDataError, match="not a directory"):
    brats.discover_cases(str(tmp_path / "missing"))


def test_mixed_versions_rejected(tmp_path):
  make_case(str(tmp_path / "a"), "2020", 1)
  make_case(str(tmp_path / "b"), "2021", 1)
  with pytest.raises(brats.BratsDataError, match="mixes BraTS versions"):
    brats.discover_cases(str(tmp_path))


def test_centers_from_name_mapping(tmp_path):
  root = tmp_path / "MICCAI_BraTS2020_TrainingData"
  for n in (1, 158, 271, 140, 340):
    make_case(str(root), "2020", n)
  (root / "name_mapping.csv").write_text(
      ",".join(brats.NAME_MAPPING_HEADER) + "\n"
      "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_001\n"
      "HGG,Brats17_2013_2_1,Brats18_2013_2_1,NA,BraTS19_2013_2_1,BraTS20_Training_140\n"
      "HGG,Brats17_TCIA_425_1,Brats18_TCIA01_425_1,TCGA-02-0006,BraTS19_TCIA01_425_1,BraTS20_Training_158\n"
      "LGG,Brats17_TCIA_101_1,Brats18_TCIA09_101_1,TCGA-CS-4942,BraTS19_TCIA09_101_1,BraTS20_Training_271\n"
      "HGG,NA,NA,NA,NA,BraTS20_Training_340\n")
  cases = {c.case_id: c for c in brats.discover_cases(str(tmp_path))}
  assert cases["BraTS20_Training_001"].center == "CBICA"
  assert cases["BraTS20_Training_158"].center == "TCIA"
  assert cases["BraTS20_Training_271"].center == "TCIA"
  assert cases["BraTS20_Training_271"].grade == "LGG"
  assert cases["BraTS20_Training_140"].center == "2013"
  assert cases["BraTS20_Training_340"].center == "BraTS2020"
  unmerged = {c.case_id: c.center for c in
              brats.discover_cases(str(tmp_path), merge_site_numbers=False)}
  assert unmerged["BraTS20_Training_271"] == "TCIA09"


def test_mapping_without_columns_is_an_error(tmp_path):
  root = tmp_path / "MICCAI_BraTS2020_TrainingData"
  make_case(str(root), "2020", 1)
  (root / "name_mapping.csv").write_text("a,b\n1,2\n")
  with pytest.raises(brats.BratsDataError, match="BraTS_2019_subject_ID"):
    brats.discover_cases(str(tmp_path))


def test_error_survives_pickling():
  import pickle
  e = pickle.loads(pickle.dumps(brats.BratsDataError("/x/y.nii", "bad")))
  assert (e.path, e.reason, str(e)) == ("/x/y.nii", "bad", "/x/y.nii: bad")
