"""The evaluation stage (dfgm_jax/eval/runs.py): runs A-E on phantom slices.

One module-scoped evaluation (a cut-paste synthetic set, made without a
diffusion model, stands in for the dfgm set; tiny segmenter, one epoch, two
stacked seeds) serves every test.
"""

import json
import os

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from data_pipeline import slice_sets
from dfgm_jax import config_checks
from dfgm_jax import errors
from dfgm_jax.eval import runs
from dfgm_jax.train import segmentation


def _config():
  from configs import tiny
  config = tiny.get_config()
  config.data.centers = "CBICA,TCIA"
  return config


class _BorrowedTest:
  """The session's slice set with TCIA's test patient also as CBICA's.

  The tiny phantom has one CBICA patient with tumor slices (in CBICA_train),
  so CBICA_test is empty; a real set would have one. The stage only reads
  splits, so this stand-in exercises every run A-E.
  """

  def __init__(self, data):
    self.data = data
    self.data_dir = data.data_dir
    self.manifest = json.loads(json.dumps(data.manifest))
    self.manifest["splits"]["CBICA_test"] = self.manifest["splits"]["TCIA_test"]

  def _split(self, split):
    return "TCIA_test" if split == "CBICA_test" else split

  def split_size(self, split):
    return self.data.split_size(self._split(split))

  def load_split(self, split):
    return self.data.load_split(self._split(split))


def _stand_in_synthetic_set(data, out_dir):
  """A CBICA_synthetic split through the data layer, no diffusion model.

  The CBICA tumor slices mirrored left-right, labelled mode cutpaste: the
  stage only needs a set in the synthetic format (the synthesis stage's
  own tests cover making one).
  """
  src = data.load_split("CBICA_train")
  n = len(src["image"])
  res = {"image": src["image"][:, :, ::-1], "mask": src["mask"][:, :, ::-1].astype(np.uint8),
         "source": [f"stand-in{i}" for i in range(n)], "center": ["CBICA"] * n,
         "slice_index": list(src["slice_index"]), "healthy": list(src["key"]),
         "rank": [0] * n}
  formats = data.write_synthetic_set(
      out_dir, {"CBICA": res}, image_size=res["image"].shape[1],
      channels=res["image"].shape[-1], mode="cutpaste", model_step=0,
      formats=("array_record",))
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    # As the synthesis stage writes it; formats: <format>/<name>/<version>.
    json.dump({"dataset": formats["array_record"].split("/")[1], "formats": formats, "image_size": res["image"].shape[1],
               "channels": res["image"].shape[-1],
               "splits": {"CBICA_synthetic": {"num_slices": n, "num_cases": n}}}, f)
  return slice_sets.SliceData(out_dir)


@pytest.fixture(scope="module")
def evaluated(preprocessed_2020, tmp_path_factory):
  data_dir, manifest = preprocessed_2020
  assert manifest["splits"]["CBICA_test"]["num_slices"] == 0  # else drop _BorrowedTest.
  config = _config()
  workdir = tmp_path_factory.mktemp("evaluate")
  real = _BorrowedTest(slice_sets.SliceData(data_dir))
  synthetic = {runs.DFGM: _stand_in_synthetic_set(real.data, str(workdir / "synthetic"))}
  # The five runs compile the same training step: a persistent compilation
  # cache compiles it once (restored afterwards for the other tests).
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  try:
    result = runs.run(config, str(workdir), real, synthetic, progress=False)
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    compilation_cache.reset_cache()
  return config, str(workdir), real, synthetic, result


def test_results_hold_runs_a_to_e_per_seed_with_gains(evaluated):
  _, workdir, _, _, result = evaluated
  assert result["trained"] == ["A", "B", "C", "D", "E"] and not result["skipped"]
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["centers"] == ["CBICA", "TCIA"]
  for rid in "ABCDE":
    r = results["runs"][rid]
    assert sorted(r["seeds"]) == ["0", "1"]
    for seed in r["seeds"].values():
      assert 0.0 <= seed["dice"] <= 1.0 and seed["hd95"] >= 0.0
    dice = [s["dice"] for s in r["seeds"].values()]
    assert r["mean"]["dice"] == pytest.approx(sum(dice) / 2)
    assert r["std"]["dice"] == pytest.approx(abs(dice[0] - dice[1]) / 2)
    # The test set is always real: its split and no synthetic mode.
    assert r["test"]["split"].endswith("_test") and "modes" not in r["test"]
  # The synthetic set is in B, D, E's training data and not in A's or C's.
  sets = {rid: [s["set"] for s in r["train"]] for rid, r in results["runs"].items()}
  assert sets == {"A": ["real"], "B": ["real", "dfgm"], "C": ["real"],
                  "D": ["real", "dfgm"], "E": ["dfgm"]}
  assert results["runs"]["D"]["train"][1]["split"] == "CBICA_synthetic"
  assert results["runs"]["C"]["test"]["split"] == "TCIA_test"
  assert set(results["gains"]) == {"B_vs_A", "D_vs_C"}
  for g in results["gains"].values():
    assert g["low"] <= g["high"] and g["n_boot"] > 0
    # The seed-averaged per-slice means are the runs' mean Dice.
    assert g["before"] == pytest.approx(results["runs"][g["before_run"]]["mean"]["dice"])
    assert g["after"] == pytest.approx(results["runs"][g["after_run"]]["mean"]["dice"])
  text = open(os.path.join(workdir, "eval", "results.md")).read()
  assert "0.51 -> 0.53" in text and "0.65 -> 0.68" in text
  assert text.count("interval") >= 2 and "cutpaste" in text  # the stand-in is said.


def test_a_rerun_reuses_the_runs_without_training(evaluated, monkeypatch):
  config, workdir, real, synthetic, first = evaluated

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(segmentation, "train", no_training)
  again = runs.run(config, workdir, real, synthetic, progress=False)
  assert again["reused"] == ["A", "B", "C", "D", "E"] and again["trained"] == []
  assert again["runs"]["B"]["seeds"] == first["runs"]["B"]["seeds"]


def test_another_seg_config_is_refused_without_overwrite(evaluated, monkeypatch):
  config, workdir, real, synthetic, _ = evaluated
  monkeypatch.setattr(segmentation, "train", lambda *a, **k: pytest.fail("trained"))
  other = _config()
  other.seg.width = 16
  with pytest.raises(errors.RunMismatch, match="width"):
    runs.run(other, workdir, real, synthetic, progress=False)


def test_runs_without_their_inputs_are_skipped_and_listed(evaluated, monkeypatch):
  config, workdir, real, _, _ = evaluated
  monkeypatch.setattr(segmentation, "train", lambda *a, **k: pytest.fail("trained"))
  result = runs.run(config, workdir, real, {runs.DFGM: None}, progress=False)
  assert result["reused"] == ["A", "C"]
  assert [s["id"] for s in result["skipped"]] == ["B", "D", "E"]
  assert set(result["runs"]) == {"A", "C"} and result["gains"] == {}
  assert "Run B skipped" in runs.report(result)


def test_plan_adds_the_baseline_runs_and_config_checks_the_seg_section():
  ids = [r.id for r in runs.plan(["cutpaste"])[0]]
  assert ids == ["A", "B", "C", "D", "E", "B_cutpaste", "D_cutpaste"]
  config = _config()
  config.seg.seeds = (0, 0)
  with pytest.raises(errors.ConfigError, match="config.seg.seeds"):
    config_checks.validate(config)
