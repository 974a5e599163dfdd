"""BraTS 2018 / 2019 folders preprocessed end to end: centers from the case ids.

Phantom folders in the official layouts (HGG/ and LGG/ under the data
folder) at a coarse scale, and the eleven real BraTS 2018 cases of
../shared/data/brats18_real (flat, no HGG/LGG; skipped with a reason when
../shared is absent, a failure under DFGM_REQUIRE_SHARED=1).
"""

import os

import numpy as np
import pytest

from data_pipeline import brats
from data_pipeline import input_pipeline
from data_pipeline import phantom
from data_pipeline import preprocess
from tests.conftest import SHARED_DATA, require_shared

AR_ONLY = {"formats": ("array_record",)}
BRATS18_REAL = os.path.join(SHARED_DATA, "brats18_real")
# ../shared/data/brats18_real/README.md: the eleven cases and their sources.
REAL_SITES = {
    "Brats18_2013_11_1": "2013", "Brats18_2013_20_1": "2013", "Brats18_2013_3_1": "2013",
    "Brats18_CBICA_ABM_1": "CBICA", "Brats18_CBICA_ALU_1": "CBICA",
    "Brats18_TCIA01_201_1": "TCIA01", "Brats18_TCIA01_378_1": "TCIA01",
    "Brats18_TCIA02_135_1": "TCIA02", "Brats18_TCIA02_370_1": "TCIA02",
    "Brats18_TCIA10_628_1": "TCIA10", "Brats18_TCIA13_623_1": "TCIA13",
}


def _labels_of(out_dir, split):
  labels = set()
  for ex in input_pipeline.read_examples(out_dir, split, "grain"):
    labels |= set(np.unique(ex["label"]).tolist())
  return labels


@pytest.mark.parametrize("version", brats.SITE_IN_ID_VERSIONS)
def test_phantom_folder_preprocesses_with_the_sites_centers(tmp_path, tiny_data_cfg,
                                                             version):
  info = phantom.generate(str(tmp_path / "raw"), version=version, num_cases=8,
                          scale=0.25)
  assert info.data_dir.endswith(brats.DATA_FOLDER_NAMES[version])
  grades = {g for g in os.listdir(info.data_dir)
            if os.path.isdir(os.path.join(info.data_dir, g))}
  assert grades == {"HGG", "LGG"}  # the releases' grade folders.
  out = str(tmp_path / "out")
  manifest = preprocess.run(info.data_dir, out, dict(tiny_data_cfg, **AR_ONLY),
                            progress=False)
  assert manifest["version"] == version
  want = {"CBICA": True, "TCIA": True, "2013": False}  # 'auto': CBICA, TCIA private.
  if version == "2019":
    want["TMC"] = False  # TMC joined in 2019.
  assert {c: v["private"] for c, v in manifest["centers"].items()} == want
  cases = {c["case_id"]: c for c in manifest["cases"]}
  assert {i: c["center"] for i, c in cases.items()} == info.center_of_case
  assert {i: c["grade"] for i, c in cases.items()} == {
      c.case_id: c.grade for c in info.cases}
  assert {c["grade"] for c in cases.values()} == {"HGG", "LGG"}
  for center in ("CBICA", "TCIA"):
    assert manifest["splits"][f"{center}_train"]["num_slices"] > 0
  # Public centers' volumes give the public healthy bank.
  assert manifest["healthy"]["public_volumes"] == sum(
      1 for c in info.cases if c.center not in ("CBICA", "TCIA"))
  assert 3 in _labels_of(out, "CBICA_train")  # label 4 -> canonical 3.


def test_sites_kept_apart_need_their_names_in_data_centers(tmp_path, tiny_data_cfg):
  info = phantom.generate(str(tmp_path / "raw"), version="2019", num_cases=8,
                          scale=0.25)
  sites = sorted({s for s in info.sites.values() if s.startswith("TCIA")})
  assert len(sites) >= 2
  cfg = dict(tiny_data_cfg, merge_site_numbers=False,
             centers=",".join(["CBICA"] + sites), **AR_ONLY)
  manifest = preprocess.run(info.data_dir, str(tmp_path / "out"), cfg,
                            progress=False)
  private = sorted(c for c, v in manifest["centers"].items() if v["private"])
  assert private == sorted(["CBICA"] + sites)
  assert "TCIA" not in manifest["centers"]
  for case in manifest["cases"]:
    assert case["center"] == info.sites[case["case_id"]]


def test_real_brats_2018_cases_preprocess_with_their_centers(tmp_path, tiny_data_cfg):
  root = require_shared(BRATS18_REAL, "the eleven real BraTS 2018 cases")
  cases = brats.discover_cases(root)
  assert {c.case_id: c.version for c in cases} == dict.fromkeys(REAL_SITES, "2018")
  assert all(set(c.files) == set(brats.MODALITIES) | {"seg"} for c in cases)
  apart = {c.case_id: c.center for c in brats.discover_cases(root, merge_site_numbers=False)}
  assert apart == REAL_SITES
  out = str(tmp_path / "out")
  manifest = preprocess.run(root, out, dict(tiny_data_cfg, **AR_ONLY), progress=False)
  assert {c: (v["num_cases"], v["private"]) for c, v in manifest["centers"].items()} == {
      "2013": (3, False), "CBICA": (2, True), "TCIA": (6, True)}
  assert {c["case_id"]: c["center"] for c in manifest["cases"]} == {
      i: brats.site_to_center(s) for i, s in REAL_SITES.items()}
  assert not manifest["skipped"]
  assert all(c["num_tumor_slices"] >= 1 for c in manifest["cases"])
  assert manifest["healthy"]["public_volumes"] == 3  # the 2013 cases.
  assert manifest["splits"]["healthy"]["num_slices"] > 0
  assert 3 in _labels_of(out, "TCIA_train")  # real enhancing tumor (label 4).
