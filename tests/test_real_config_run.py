"""configs/real_cpu.py's first pipeline stages on the committed real fixture.

The real run (docs/real_data_run.md) reads ../shared; this test makes a small
BraTS 2018 folder of copies of tests/data/real_tcga_du_7294 (real anatomy,
3 mm voxels) with the sites of the eleven real cases in miniature (one 2013
case, two CBICA, three TCIA), so the real config's splits and federated G1
over a one-patient CBICA client run on a bare clone.
"""

import json
import os
import shutil

import pytest

from data_pipeline import brats
from launch import pipeline
from tests.conftest import REAL_FIXTURE, REAL_ID

SITES = ("2013", "CBICA", "CBICA", "TCIA01", "TCIA02", "TCIA10")


def _fixture_folder(root) -> str:
  """A flat BraTS 2018 folder: one copy of the real fixture per entry of SITES."""
  for number, site in enumerate(SITES, start=1):
    case_id = brats.case_id_for("2018", number, site=site)
    folder = os.path.join(root, case_id)
    os.makedirs(folder)
    for m in brats.MODALITIES + ("seg",):
      shutil.copy(os.path.join(REAL_FIXTURE, f"{REAL_ID}_{m}.nii.gz"),
                  os.path.join(folder, brats.file_stem("2018", case_id, m) + ".nii.gz"))
  return str(root)


@pytest.mark.slow
def test_real_config_preprocesses_and_trains_federated_g1_on_real_anatomy(tmp_path):
  from configs import real_cpu
  config = real_cpu.get_config()
  # The real config's data and federation, G1 cut to one round of a few steps.
  config.fed.rounds = 1
  config.fed.local_steps = config.train.steps_per_dispatch * 2
  brats_dir = _fixture_folder(tmp_path / "brats18")
  run = pipeline.Run(config, str(tmp_path / "work"), brats_dir=brats_dir, num_workers=1)
  out = pipeline.run_stages(run, pipeline.STAGES[:3])
  manifest = json.loads((tmp_path / "work" / "slices" / "manifest.json").read_text())
  assert {c: (v["num_cases"], v["private"]) for c, v in manifest["centers"].items()} == {
      "2013": (1, False), "CBICA": (2, True), "TCIA": (3, True)}
  splits = {name: s["num_cases"] for name, s in manifest["splits"].items()}
  # test_fraction 0.3: CBICA 1 / 1, TCIA round(0.9) = 1 test, 2 train.
  assert (splits["CBICA_train"], splits["CBICA_test"]) == (1, 1)
  assert (splits["TCIA_train"], splits["TCIA_test"]) == (2, 1)
  assert manifest["splits"]["healthy"]["num_slices"] > 0  # the 2013 copy's
  assert manifest["image_size"] == config.data.image_size
  rows = [json.loads(l) for l in
          (tmp_path / "work" / "g1" / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 1 and rows[0]["CBICA/num_examples"] > 0
  assert out["train G1"]["G1 step"] == config.fed.local_steps
