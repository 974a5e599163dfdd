"""The evaluation stage (dfgm_jax/eval/runs.py): runs A-E on phantom slices.

One module-scoped evaluation (a cut-paste synthetic set, made without a
diffusion model, stands in for the dfgm set; tiny segmenter, one epoch, two
stacked seeds) serves every test.
"""

import json
import os

import numpy as np
from PIL import Image
import pytest

from data_pipeline import slice_sets
from dfgm_jax import compile_cache
from dfgm_jax import config_checks
from dfgm_jax import errors
from dfgm_jax.eval import figures
from dfgm_jax.eval import runs
from dfgm_jax.eval import segmentation_metrics
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
    for part in ("test", "test_healthy"):  # the tumor-free test slices too.
      self.manifest["splits"][f"CBICA_{part}"] = self.manifest["splits"][f"TCIA_{part}"]

  def _split(self, split):
    return {"CBICA_test": "TCIA_test",
            "CBICA_test_healthy": "TCIA_test_healthy"}.get(split, split)

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


def _compilation_cache(path):
  """A persistent compilation cache in `path` for the block (every program,
  however fast its compile): runs that compile the same step compile it
  once; the settings are restored after, for the other tests."""
  return compile_cache.enabled(str(path), min_compile_s=0)


@pytest.fixture(scope="module")
def evaluated(preprocessed_2020, tmp_path_factory):
  data_dir, manifest = preprocessed_2020
  assert manifest["splits"]["CBICA_test"]["num_slices"] == 0  # else drop _BorrowedTest.
  config = _config()
  workdir = tmp_path_factory.mktemp("evaluate")
  real = _BorrowedTest(slice_sets.SliceData(data_dir))
  synthetic = {runs.DFGM: _stand_in_synthetic_set(real.data, str(workdir / "synthetic"))}
  # The five runs compile the same training step: compiled once.
  with _compilation_cache(workdir / "xla_cache"):
    result = runs.run(config, str(workdir), real, synthetic, progress=False)
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
  for rid in "ABCDE":
    r = results["runs"][rid]
    # Every run the same optimizer steps (tiny: budget=steps, 6), whatever
    # its training set's size.
    assert r["steps"] == 6 and r["train_slices"] == sum(t["num_slices"] for t in r["train"])
    assert (r["test_patients"], r["test_slices"]) == (1, r["test"]["num_slices"])
    assert set(r["convergence"]) == {"converged", "window", "tolerance", "seeds"}
  assert results["budget"] == {"rule": "steps", "steps": 6}
  # Preprocessing recorded that the slices come from the phantom.
  assert results["data_source"] == "phantom"
  for g in results["gains"].values():
    # One test patient: no interval, and the verdict says why.
    assert g["n_patients"] == 1 and g["low"] is None and g["high"] is None
    assert g["verdict"] == "too few test patients to tell (n = 1 < 5)"
    assert g["n_boot"] > 0 and set(g["per_seed"]) == {"0", "1"}
    # The seed-averaged per-slice means are the runs' mean Dice.
    assert g["before"] == pytest.approx(results["runs"][g["before_run"]]["mean"]["dice"])
    assert g["after"] == pytest.approx(results["runs"][g["after_run"]]["mean"]["dice"])
  text = open(os.path.join(workdir, "eval", "results.md")).read()
  assert "0.51 -> 0.53" in text and "0.65 -> 0.68" in text
  # Two gains and their two false-positive comparisons, none with an interval.
  assert text.count("too few test patients to tell") == 4 and "interval" not in text
  assert "cutpaste" in text  # the stand-in is said.
  assert "phantom data: its Dice is not the paper's Dice (BraTS)" in text
  assert "| test patients / slices |" in text and "reproduce" not in text
  assert "A's loss changed by" in text and "C's loss changed by" in text


FIGURES = {"overlay_B_vs_A", "overlay_D_vs_C", "dice_per_run", "training_curves"}


def _check_figures(workdir, results):
  """The listed figures exist under W/eval as PNGs of a plausible size."""
  assert set(results["figures"]) == FIGURES and results["figures_skipped"] == []
  sizes = {}
  for name, rel in results["figures"].items():
    assert rel == f"figures/{name}.png"  # relative to W/eval, never absolute.
    with Image.open(os.path.join(workdir, "eval", rel)) as im:
      im.verify()  # a complete, valid PNG.
    with Image.open(os.path.join(workdir, "eval", rel)) as im:
      assert im.format == "PNG"
      sizes[name] = im.size
    assert min(sizes[name]) >= 200 and max(sizes[name]) <= 4000, (name, sizes[name])
  # Four columns; a row per test slice shown (up to figures.OVERLAY_SLICES).
  width, height = sizes["overlay_B_vs_A"]
  assert width > 600
  assert [f for f in os.listdir(os.path.join(workdir, "eval", "figures"))
          if not f.endswith(".png")] == []  # no temporary file left.
  return sizes


def test_figures_are_drawn_listed_and_linked(evaluated):
  _, workdir, _, _, result = evaluated
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    results = json.load(f)
  assert results["figures"] == result["figures"]
  _check_figures(workdir, results)
  text = open(os.path.join(workdir, "eval", "results.md")).read()
  for rel in results["figures"].values():
    assert f"]({rel})" in text
  assert workdir not in json.dumps(results) + text  # no local absolute path.


def test_representative_seed_is_the_median_dice_seed():
  seeds = {"3": {"dice": 0.9}, "1": {"dice": 0.2}, "7": {"dice": 0.5}}
  assert runs.representative_seed(seeds) == "7"
  # An even number: the lower of the two middle ones (never the best).
  assert runs.representative_seed({"0": {"dice": 0.6}, "1": {"dice": 0.4}}) == "1"
  assert runs.representative_seed({"0": {"dice": 0.4}, "1": {"dice": 0.4}}) == "0"


def test_stored_predictions_are_the_median_dice_seeds_masks(evaluated):
  config, workdir, real, _, _ = evaluated
  for rid, split in (("B", "CBICA_test"), ("C", "TCIA_test")):
    run_dir = os.path.join(workdir, "eval", "runs", rid)
    with open(os.path.join(run_dir, "record.json")) as f:
      record = json.load(f)
    stored = runs.read_predictions(os.path.join(run_dir, runs.PREDICTIONS),
                                   record["identity"]["test"])
    seed = runs.representative_seed(record["seeds"])
    assert stored is not None and stored["seed"] == seed
    test = real.load_split(split)
    assert stored["mask"].dtype == np.uint8 and stored["mask"].shape == test["mask"].shape[:3]
    # What the loaded seed predicts (the probability to 1/255, and
    # thresholded as the evaluator does), and not what the other does.
    models = {str(m.seed): m for m in segmentation.load(config, os.path.join(run_dir, "seg"))}
    other = next(s for s in models if s != seed)
    probs = {s: segmentation.predict(m, test["image"][:2])[..., 0] for s, m in models.items()}
    np.testing.assert_array_equal(stored["mask"][:2], (probs[seed] > 0.5).astype(np.uint8))
    assert stored["prob"].dtype == np.uint8
    np.testing.assert_allclose(stored["prob"][:2] / 255.0, probs[seed],
                               atol=0.5 / 255 + 1e-6)
    assert np.abs(stored["prob"][:2] / 255.0 - probs[other]).max() > 2.0 / 255
    # Every stored slice scores the per-slice Dice the run recorded for it.
    ev = segmentation_metrics.SegmentationEvaluator(kind="probs")
    ev.update(stored["mask"][..., None].astype(np.float32), test["mask"],
              [str(c) for c in test["case_id"]])
    np.testing.assert_allclose(ev.per_slice()["dice"], record["per_slice"][seed]["dice"])


def test_false_positives_on_tumor_free_test_slices_are_recorded_and_reported(evaluated):
  config, workdir, real, _, result = evaluated
  healthy = real.load_split("TCIA_test_healthy")
  n = len(healthy["image"])
  assert n > 0 and all(healthy["mask"].sum(axis=(1, 2, 3)) == 0)  # tumor-free.
  for rid in "ABCDE":
    fp = result["runs"][rid]["false_positives"]
    split = result["runs"][rid]["test"]["split"] + "_healthy"
    assert fp["split"] == split and fp["n_slices"] == n
    assert fp["n_patients"] == len(set(healthy["case_id"]))
    assert sorted(fp["seeds"]) == ["0", "1"] and fp["spacing_mm"] is None
    for v in fp["seeds"].values():
      assert 0 <= v["slices_with_fp"] <= 1 and v["fp_mm2"] is None
      assert v["fp_fraction"] == pytest.approx(v["fp_pixels"] / healthy["image"][0, ..., 0].size)
    assert fp["mean"]["fp_pixels"] == pytest.approx(
        np.mean([v["fp_pixels"] for v in fp["seeds"].values()]))
    assert fp["mean"]["fp_mm2"] is None
  # The record carries them with the set they were measured on; the stored
  # bits are each seed's predictions, which the counts come from.
  run_dir = os.path.join(workdir, "eval", "runs", "C")
  with open(os.path.join(run_dir, "record.json")) as f:
    record = json.load(f)
  stored = record["false_positives"]
  assert stored["test_healthy"]["split"] == "TCIA_test_healthy"
  assert stored["test_healthy"]["num_slices"] == n
  assert "test_healthy" not in json.dumps(record["identity"])  # not the run's identity.
  masks = runs.read_false_positive_masks(run_dir)
  assert masks["seeds"] == ["0", "1"] and masks["mask"].shape == (2,) + healthy["image"].shape[:3]
  assert masks["test_healthy_sha256"] == stored["test_healthy"]["sha256"]
  for i, seed in enumerate(masks["seeds"]):
    assert masks["mask"][i].sum(axis=(1, 2)).tolist() == stored["per_slice"][seed]
  models = segmentation.load(config, os.path.join(run_dir, "seg"))
  probs = segmentation.predict(models[0], healthy["image"])[..., 0]
  np.testing.assert_array_equal(masks["mask"][0], probs > 0.5)
  text = open(os.path.join(workdir, "eval", "results.md")).read()
  assert "| run | tumor-free slices (patients) | FP area per slice" in text
  assert "B's false-positive area per tumor-free slice is" in text
  assert "D's false-positive area per tumor-free slice is" in text
  # The fixture's one test patient: no interval, no reading of the difference.
  d = result["gains"]["D_vs_C"]["false_positives"]
  assert d["low"] is None and d["verdict"].startswith("too few test patients to tell")
  assert "predicts" not in text and "too few test patients to tell (n = 1 < 5)." in text


def _fp_record(per_slice: dict, patients: list) -> dict:
  return {"per_slice": per_slice, "patients": patients}


def test_false_positive_difference_reads_only_what_its_interval_shows():
  patients = [f"p{i // 2}" for i in range(12)]  # 6 patients, 2 slices each.
  zeros = [0] * 12
  # After predicts 20 px on every slice of every patient and seed: more.
  more = runs.false_positive_difference(
      _fp_record({"0": [20] * 12, "1": [20] * 12}, patients),
      _fp_record({"0": zeros, "1": zeros}, patients), ["0", "1"], 5)
  assert more["difference"] == 20 and more["low"] > 0 and more["verdict"] == "more false positives"
  # One patient's slices and one seed carry the whole difference: the
  # resampled patients and seeds put 0 inside the interval.
  one = [30, 30] + [0] * 10
  noisy = runs.false_positive_difference(
      _fp_record({"0": one, "1": zeros}, patients),
      _fp_record({"0": zeros, "1": zeros}, patients), ["0", "1"], 5)
  assert noisy["difference"] > 0 and noisy["low"] <= 0 <= noisy["high"]
  assert noisy["verdict"] == "no evidence of a difference in false positives"
  fewer = runs.false_positive_difference(
      _fp_record({"0": zeros, "1": zeros}, patients),
      _fp_record({"0": [5] * 12, "1": [7] * 12}, patients), ["0", "1"], 5)
  assert fewer["high"] < 0 and fewer["verdict"] == "fewer false positives"
  small = runs.false_positive_difference(
      _fp_record({"0": [20] * 12}, patients), _fp_record({"0": zeros}, patients), ["0"], 7)
  assert small["low"] is None and small["verdict"] == "too few test patients to tell (n = 6 < 7)"


def test_pick_slices_takes_the_largest_tumors_one_patient_first():
  ref = np.zeros((5, 4, 4, 1), np.uint8)
  for i, area in enumerate([5, 9, 3, 0, 9]):
    ref[i].flat[:area] = 1
  patients = ["a", "a", "b", "c", "b"]
  # The largest of a (9) and of b (9, the earlier wins ties) before a's 5.
  assert figures.pick_slices(ref, patients, 2) == [1, 4]
  assert figures.pick_slices(ref, patients, 3) == [1, 4, 0]
  assert figures.pick_slices(ref, patients, 9) == [1, 4, 0, 2, 3]


def test_a_rerun_reuses_the_runs_without_training(evaluated, monkeypatch):
  config, workdir, real, synthetic, first = evaluated

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(segmentation, "train", no_training)
  # Figures drawn again from the stored predictions; a run recorded before
  # predictions were stored gets them from its checkpoints.
  eval_dir = os.path.join(workdir, "eval")
  for f in os.listdir(os.path.join(eval_dir, "figures")):
    os.remove(os.path.join(eval_dir, "figures", f))
  stored = os.path.join(eval_dir, "runs", "A", runs.PREDICTIONS)
  with np.load(stored) as f:
    before = f["mask"]
  os.remove(stored)
  again = runs.run(config, workdir, real, synthetic, progress=False)
  assert again["reused"] == ["A", "B", "C", "D", "E"] and again["trained"] == []
  assert again["runs"]["B"]["seeds"] == first["runs"]["B"]["seeds"]
  _check_figures(workdir, again)
  with np.load(stored) as f:
    np.testing.assert_array_equal(f["mask"], before)


def test_a_run_recorded_without_false_positives_gets_them_from_its_checkpoints(
    evaluated, monkeypatch):
  config, workdir, real, synthetic, first = evaluated
  monkeypatch.setattr(segmentation, "train", lambda *a, **k: pytest.fail("trained"))
  run_dir = os.path.join(workdir, "eval", "runs", "A")
  record_path = os.path.join(run_dir, "record.json")
  with open(record_path) as f:
    record = json.load(f)
  measured = record.pop("false_positives")
  with open(record_path, "w") as f:  # as a run recorded before the measure.
    json.dump(record, f)
  os.remove(os.path.join(run_dir, runs.FP_PREDICTIONS))
  again = runs.run(config, workdir, real, synthetic, progress=False)
  assert again["reused"] == ["A", "B", "C", "D", "E"] and again["trained"] == []
  with open(record_path) as f:
    restored = json.load(f)
  assert restored["identity"] == record["identity"] and restored["seeds"] == record["seeds"]
  assert restored["false_positives"] == measured
  assert again["runs"]["A"]["false_positives"] == first["runs"]["A"]["false_positives"]
  assert os.path.exists(os.path.join(run_dir, runs.FP_PREDICTIONS))


class _OldSlices(_BorrowedTest):
  """Slices preprocessed before <center>_test_healthy existed."""

  def __init__(self, data):
    super().__init__(data)
    for center in ("CBICA", "TCIA"):
      del self.manifest["splits"][f"{center}_test_healthy"]

  def split_size(self, split):
    if split not in self.manifest["splits"]:
      raise slice_sets.UnknownSplit(f"no split {split!r}")
    return super().split_size(split)


def test_old_slices_without_test_healthy_skip_false_positives_with_the_reason(
    evaluated, monkeypatch):
  config, workdir, real, synthetic, _ = evaluated
  monkeypatch.setattr(segmentation, "train", lambda *a, **k: pytest.fail("trained"))
  monkeypatch.setattr(segmentation, "load", lambda *a, **k: pytest.fail("loaded"))
  result = runs.run(config, workdir, _OldSlices(real.data), synthetic, progress=False)
  assert result["reused"] == ["A", "B", "C", "D", "E"]
  for rid, center in (("A", "CBICA"), ("C", "TCIA")):
    assert result["runs"][rid]["false_positives"] == {
        "split": f"{center}_test_healthy",
        "skipped": f"false positives not measured: no {center}_test_healthy split "
                   "(rebuild the slices with --overwrite)"}
  text = runs.report(result)
  assert "B vs A: false positives not compared (B: false positives not measured: no " in text
  # The runs' records keep what was measured before.
  with open(os.path.join(workdir, "eval", "runs", "A", "record.json")) as f:
    assert "false_positives" in json.load(f)


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
  text = runs.report(result)
  assert "Run B skipped" in text
  # The before runs' convergence is said without their after runs.
  assert "A's loss changed by" in text and "C's loss changed by" in text
  # The overlays of runs not run are listed, not drawn (and an old one removed).
  assert set(result["figures"]) == {"dice_per_run", "training_curves"}
  assert {s["figure"] for s in result["figures_skipped"]} == {"overlay_B_vs_A",
                                                               "overlay_D_vs_C"}
  assert sorted(os.listdir(os.path.join(workdir, "eval", "figures"))) == [
      "dice_per_run.png", "training_curves.png"]


def test_a_set_the_user_named_that_is_missing_is_an_error_not_a_skip(tmp_path):
  from launch import pipeline  # pylint: disable=g-import-not-at-top
  config, workdir = _config(), str(tmp_path / "w")
  config.evaluation.baselines = ("cutpaste",)
  # Missing defaults: their runs are skipped (None), as before.
  _, synthetic = pipeline.evaluation_sets(workdir, config)
  assert synthetic == {runs.DFGM: None, "cutpaste": None}
  typo = str(tmp_path / "synthetc")
  for kwargs, flag, path in (
      ({"synthetic_dir": typo}, "--synthetic_dir", typo),
      ({"local_dir": typo}, "--local_dir", typo),
      ({"modes": ["cutpaste"]}, "--baselines", os.path.join(workdir, "baselines")),
      ({"data_dir": typo}, "--data_dir", typo)):
    with pytest.raises(errors.UserError) as e:
      pipeline.evaluation_sets(workdir, config, **kwargs)
    assert str(e.value).startswith(f"{flag}: ") and path in str(e.value), str(e.value)


def test_a_figure_that_fails_is_listed_not_raised(evaluated, monkeypatch):
  config, workdir, real, synthetic, _ = evaluated
  monkeypatch.setattr(segmentation, "train", lambda *a, **k: pytest.fail("trained"))

  def broken(*args, **kwargs):
    raise RuntimeError("no display")

  monkeypatch.setattr(figures, "curves_figure", broken)
  result = runs.run(config, workdir, real, synthetic, progress=False)
  assert "training_curves" not in result["figures"] and "dice_per_run" in result["figures"]
  assert result["figures_skipped"] == [{"figure": "training_curves",
                                        "reason": "RuntimeError: no display"}]
  assert "Figure training_curves not drawn: RuntimeError: no display" in runs.report(result)


def test_a_run_without_predictions_or_checkpoints_loses_its_overlay_only(
    evaluated, monkeypatch):
  config, workdir, real, synthetic, _ = evaluated
  monkeypatch.setattr(segmentation, "train", lambda *a, **k: pytest.fail("trained"))

  def no_checkpoint(config, workdir):
    raise errors.UserError(f"{workdir}: no segmenter checkpoint")

  monkeypatch.setattr(segmentation, "load", no_checkpoint)
  os.remove(os.path.join(workdir, "eval", "runs", "A", runs.PREDICTIONS))
  result = runs.run(config, workdir, real, synthetic, progress=False)
  assert result["reused"] == ["A", "B", "C", "D", "E"]
  assert set(result["figures"]) == FIGURES - {"overlay_B_vs_A"}
  [skipped] = result["figures_skipped"]
  assert skipped["figure"] == "overlay_B_vs_A"
  assert "run A has no stored predictions" in skipped["reason"]


def test_plan_adds_the_baseline_runs_and_config_checks_the_seg_section():
  ids = [r.id for r in runs.plan(["cutpaste"])[0]]
  assert ids == ["A", "B", "C", "D", "E", "B_cutpaste", "D_cutpaste"]
  # Center 2's local synthesis with G2: center 2 real + the local set (its
  # split named after center 1's tumors), tested on center 2, against C.
  plan, gains = runs.plan([runs.LOCAL])
  (local,) = [r for r in plan if r.id == "D_local"]
  assert local.train == ((runs.REAL, 1), (runs.LOCAL, 0)) and local.test == 1
  assert ("D_local", "C") in gains
  config = _config()
  config.seg.seeds = (0, 0)
  with pytest.raises(errors.ConfigError, match="config.seg.seeds"):
    config_checks.validate(config)


def test_runs_smaller_than_one_batch_are_skipped_not_fatal(evaluated, monkeypatch):
  _, workdir, real, synthetic, _ = evaluated
  monkeypatch.setattr(segmentation, "train", lambda *a, **k: pytest.fail("trained"))
  config = _config()
  config.seg.batch_size = 10_000  # no run's training slices fill one batch.
  result = runs.run(config, workdir + "_small", real, synthetic, progress=False)
  assert result["trained"] == [] and result["runs"] == {}
  assert [s["id"] for s in result["skipped"]] == ["A", "B", "C", "D", "E"]
  assert all("fewer than config.seg.batch_size=10000" in s["reason"]
             for s in result["skipped"])


def _drawn(monkeypatch):
  """Spies on figures._save: the figures drawn, before they are closed."""
  from matplotlib import collections  # pylint: disable=g-import-not-at-top
  seen = []
  save = figures._save

  def spy(fig, path, dpi=110):
    seen.append({"legends": [t.get_text() for lg in fig.legends for t in lg.get_texts()],
                 "axes_legends": [[t.get_text() for t in ax.get_legend().get_texts()]
                                  if ax.get_legend() else [] for ax in fig.axes],
                 "texts": [t.get_text() for t in fig.texts],
                 "titles": [ax.get_title() for ax in fig.axes],
                 "points": sum(len(c.get_offsets()) for ax in fig.axes  # scatter dots.
                               for c in ax.collections
                               if isinstance(c, collections.PathCollection))})
    return save(fig, path, dpi)

  monkeypatch.setattr(figures, "_save", spy)
  return seen


def test_overlay_figure_has_a_legend_and_names_the_seeds(tmp_path, monkeypatch):
  seen = _drawn(monkeypatch)
  image = np.zeros((2, 16, 16, 1), np.float32)
  ref = np.zeros((2, 16, 16, 1), np.uint8)
  ref[:, 4:9, 4:9] = 1
  path = str(tmp_path / "o.png")
  figures.overlay_figure(path, image, ref, ref, ref[:, ::-1], [1.0, 1.0], [0.2, 0.3],
                         ["p/1", "p/2"], ("A", "B"), seeds=("1", "0"))
  assert os.path.getsize(path) > 0
  [drawn] = seen
  assert drawn["legends"] == ["reference (filled)", "reference outline",
                              "prediction (probability > 0.5)"]
  assert "before (A, seed 1)\nDice 1.000" in drawn["titles"]
  assert "after (B, seed 0)\nDice 0.200" in drawn["titles"]


def test_dice_figure_keeps_the_papers_values_apart_from_phantom_dice(tmp_path, monkeypatch):
  seen = _drawn(monkeypatch)
  run = {"seeds": {"0": {"dice": 0.4}, "1": {"dice": 0.6}}, "mean": {"dice": 0.5},
         "std": {"dice": 0.1}, "paper_dice": 0.51}
  for kind in ("phantom", "real", "unknown"):
    figures.dice_figure(str(tmp_path / f"{kind}.png"), {"A": run, "E": dict(run, paper_dice=None)},
                        source_kind=kind)
    assert os.path.exists(tmp_path / f"{kind}.png")
  phantom, real, unknown = seen
  # Phantom: the seeds' 4 dots only, no paper diamond, and the note says why.
  assert phantom["points"] == 4 and "paper (BraTS)" not in phantom["axes_legends"][0]
  assert phantom["texts"] == [figures.PHANTOM_NOTE]
  assert real["points"] == 5 and "paper (BraTS)" in real["axes_legends"][0]
  assert real["texts"] == []
  assert unknown["points"] == 5 and unknown["texts"] == [figures.UNKNOWN_NOTE]


def test_training_curves_put_each_gains_runs_on_one_axis(tmp_path, monkeypatch):
  seen = _drawn(monkeypatch)
  curves = {"A": {"0": ([1, 2], [1.0, 0.5]), "1": ([1, 2], [0.9, 0.6])},
            "B": {"0": ([1, 2, 3, 4], [1.0, 0.7, 0.5, 0.4]), "1": ([1, 2, 3, 4], [1, .8, .6, .5])},
            "E": {}}
  panels = runs.curve_panels(curves, [("B", "A"), ("D", "C")])
  assert list(panels) == ["B vs A", "run E"] and list(panels["B vs A"]) == ["A", "B"]
  figures.curves_figure(str(tmp_path / "c.png"), panels)
  [drawn] = seen
  assert drawn["titles"][:2] == ["B vs A", "run E"]
  # The budgets show: each run's mean line names its last optimizer step.
  assert drawn["axes_legends"][0] == ["A: 2 seeds, 2 steps (mean)",
                                      "B: 2 seeds, 4 steps (mean)"]


# --- Equal budgets, intervals, verdicts -------------------------------------


def _gain_record(before, after, patients, seeds=("0",)):
  """A hand-made gain from per-slice Dice (seeds x slices) of two runs."""
  rec = lambda d: {"per_slice": {s: {"dice": list(map(float, row))} for s, row in zip(seeds, d)},
                   "patients": list(patients)}
  return runs._gain(rec(np.atleast_2d(after)), rec(np.atleast_2d(before)), list(seeds), 5)


@pytest.mark.parametrize("n_patients", [1, 2])
def test_too_few_test_patients_give_no_interval(n_patients):
  patients = [f"p{i % n_patients}" for i in range(8)]
  before = np.linspace(0.3, 0.6, 8)
  g = _gain_record(before, before * 1.3, patients)
  assert g["gain"] == pytest.approx(0.3) and g["n_patients"] == n_patients
  assert g["low"] is None and g["high"] is None
  assert g["verdict"] == f"too few test patients to tell (n = {n_patients} < 5)"
  assert runs.gain_summary(g) == (
      f"+30.0 %: too few test patients to tell (n = {n_patients} < 5)")
  # The JSON says so too (null, not a zero-width interval).
  assert json.loads(json.dumps(g))["low"] is None


def test_the_verdict_reads_each_interval_plainly():
  base = {"n_patients": 6, "min_test_patients": 5, "gain": 0.1}
  verdict = lambda low, high, **kw: runs.gain_verdict({**base, "low": low, "high": high, **kw})
  assert verdict(0.02, 0.2) == "consistent with a gain"
  assert verdict(-0.05, 0.2) == "no evidence of a difference"
  assert verdict(0.0, 0.0) == "no evidence of a difference"
  assert verdict(-0.3, -0.01) == "consistent with a loss (the synthetic data hurt here)"
  assert verdict(None, None, n_patients=4) == "too few test patients to tell (n = 4 < 5)"
  assert verdict(float("nan"), float("nan"), gain=float("nan")) == (
      "undefined (a mean Dice of 0 before)")
  # The old sentence's claim is gone from every outcome.
  for low, high in ((0.02, 0.2), (-0.05, 0.2), (-0.3, -0.01)):
    assert "reproduce" not in verdict(low, high)


def test_opposite_seeds_widen_the_runs_interval_to_include_0():
  patients = np.repeat([f"p{i}" for i in range(6)], 3)
  before = np.random.default_rng(0).uniform(0.4, 0.6, 18)
  g = _gain_record(np.stack([before, before]), np.stack([before * 1.2, before * 0.84]),
                   patients, seeds=("0", "1"))
  assert g["per_seed"] == pytest.approx({"0": 0.2, "1": -0.16})
  assert g["low"] < 0 < g["high"] and g["verdict"] == "no evidence of a difference"
  assert runs.gain_summary(g).startswith("+2.0 % [-") and runs.gain_summary(g).endswith(
      "%]: no evidence of a difference")


def _metrics_rows(path, curve, seeds=(0, 1)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for step, losses in curve:
      f.write(json.dumps({"step": step, **{f"loss_seed{s}": l for s, l in zip(seeds, losses)}})
              + "\n")


def test_the_convergence_check_on_a_hand_made_metrics_file(tmp_path):
  seg_dir = str(tmp_path / "seg")
  # Seed 0 falls to 0.20 by step 40, then flat (+- noise); seed 1 still
  # falling; logged every 10 of 100 steps: 2 rows per 20 % window.
  rows = [(s, (max(0.2, 1.0 - 0.02 * s) + (0.004 * (-1) ** (s // 10) if s > 40 else 0.0),
               1.0 - 0.008 * s)) for s in range(10, 101, 10)]
  _metrics_rows(os.path.join(seg_dir, "seeds_0_1", "metrics.jsonl"), rows)
  c = runs.run_convergence(seg_dir, [0, 1])
  flat, falling = c["seeds"]["0"], c["seeds"]["1"]
  assert flat["converged"] and abs(flat["share"]) < 0.05 and flat["steps"] == 100
  # Steps 90, 100 against 70, 80: (0.24 - 0.4) / 0.4 = -40 %, which is
  # (0.4 - 0.24) / (0.92 - 0.24) = 23.5 % of its fall since step 10.
  assert not falling["converged"] and falling["change"] == pytest.approx(-0.4)
  assert falling["share"] == pytest.approx(0.16 / 0.68)
  assert c["converged"] is False and c["tolerance"] == runs.CONVERGENCE_TOLERANCE
  text = runs._convergence_sentence("A", {"convergence": c, "steps": 100})
  assert "A's loss changed by" in text and "-40.0 % (seed 1; 23.5 % of its fall" in text
  assert "not flat (still falling by more than 5 % of its fall): the budget may be" in text
  flat_only = {**c, "converged": True, "seeds": {"0": flat}}
  assert runs._convergence_sentence("A", {"convergence": flat_only, "steps": 100}).endswith(
      ": flat (under 5 % of its fall).")
  # A loss that falls towards 0 as a small set is memorised: -25 % in the
  # last window, yet a sliver of its whole fall: flat.
  steps = list(range(10, 301, 10))
  memorising = [0.7 * 0.8 ** (s / 10) + 0.01 for s in steps]
  m = runs.convergence(steps, memorising)
  assert m["change"] < -0.2 and m["converged"]
  # Too few logged losses to tell: unknown, not flat.
  assert runs.convergence([5, 10], [0.5, 0.4])["converged"] is None
  # A loss that never fell: unknown.
  assert runs.convergence(steps, [0.5 + 0.001 * i for i in range(len(steps))])["converged"] is None


def test_the_data_source_is_read_from_the_manifest():
  assert runs.data_source({"source": {"kind": "phantom"}}) == "phantom"
  assert runs.data_source({"source": {"kind": "real"}}) == "real"
  assert runs.data_source({}) == "unknown"  # slices made before it was recorded.


class _ToySet:
  """A SliceData-like set of in-memory splits (toy squares, 32 x 32)."""

  def __init__(self, splits, manifest=None):
    self.splits = splits
    self.data_dir = "toy"
    self.manifest = manifest or {}

  def split_size(self, split):
    if split not in self.splits:
      raise errors.UserError(f"no split {split}")
    return len(self.splits[split]["image"])

  def load_split(self, split):
    return self.splits[split]


def _toy_config(budget, **seg):
  import ml_collections
  from configs import data as data_cfg
  from configs import segmentation as seg_cfg
  config = ml_collections.ConfigDict()
  config.data = data_cfg.get_data_config()
  config.data.image_size = 32
  config.data.centers = "TOY"
  config.seg = seg_cfg.get_seg_config()
  config.seg.update(width=4, depth=1, lr=1e-2, batch_size=8, seeds=(0, 1), log_every=2,
                    checkpoint_every_epochs=0, async_checkpoints=False, tensorboard=False,
                    budget=budget, **seg)
  config.evaluation = seg_cfg.get_evaluation_config()
  return config


def test_training_longer_on_the_same_slices_is_no_gain_once_steps_are_matched(tmp_path):
  """The control a reviewer asks for: the "synthetic" set is a copy of the real
  training split, so the after run only trains longer on the same slices.
  The epoch rule gives it twice the steps of an under-trained before run
  (16 against 32) and reads a gain; with both at 64 steps there is none."""
  from tests.test_segmentation_train import toy_set
  image, mask = toy_set(32, seed=0)
  test_image, test_mask = toy_set(24, seed=1)
  train = {"image": image, "mask": mask}
  real = _ToySet({"TOY_train": train,
                  "TOY_test": {"image": test_image, "mask": test_mask,
                               "case_id": np.repeat([f"p{i}" for i in range(6)], 4)}},
                 manifest={"source": {"kind": "phantom"}})
  copy = _ToySet({"TOY_synthetic": {k: v.copy() for k, v in train.items()}})
  with _compilation_cache(tmp_path / "xla_cache"):
    out = {budget: runs.run(_toy_config(budget, epochs=4, steps=64), str(tmp_path / budget),
                            real, {"cutpaste": copy}, progress=False)
           for budget in ("epochs", "steps")}
  for budget, result in out.items():
    assert result["trained"] == ["A", "B_cutpaste"], budget
  epochs, steps = (out[b]["gains"]["B_cutpaste_vs_A"] for b in ("epochs", "steps"))
  assert [out["epochs"]["runs"][r]["steps"] for r in ("A", "B_cutpaste")] == [16, 32]
  assert [out["steps"]["runs"][r]["steps"] for r in ("A", "B_cutpaste")] == [64, 64]
  # The epoch rule: a gain from the steps alone, its interval above 0.
  assert epochs["n_patients"] == 6 and epochs["low"] > 0.05
  assert epochs["verdict"] == "consistent with a gain"
  # Matched steps: no gain, the interval includes 0.
  assert steps["low"] <= 0 <= steps["high"] and abs(steps["gain"]) < 0.02
  assert steps["verdict"] == "no evidence of a difference"
  assert epochs["gain"] > steps["gain"] + 0.05
  # A's loss is still falling after 16 steps (measured: -11 % and -14 %
  # over its last 20 %; at 64 steps, with Dice saturated at 0.99, the BCE
  # still falls by 30-45 %: the check is about the loss, not the Dice).
  assert out["epochs"]["runs"]["A"]["convergence"]["converged"] is False
  text = runs.report(out["steps"])
  assert "Every run trained 64 optimizer steps" in text
  assert "phantom data: its Dice is not the paper's Dice (BraTS)" in text
  assert "| A | center 1 real | 32 | 64 | TOY_test | 6 / 24 |" in text
  assert "no evidence of a difference" in text and "reproduce" not in text


def test_the_budget_and_its_length_define_an_evaluation_run():
  config = _toy_config("steps", steps=300, epochs=15)
  ident = runs.seg_identity(config)["seg"]
  assert ident["budget"] == "steps" and ident["steps"] == 300 and "epochs" not in ident
  # The unused length trains nothing: the same identity.
  other = _toy_config("steps", steps=300, epochs=40)
  assert runs.seg_identity(other) == runs.seg_identity(config)
  # Another step count or rule is another run (refused without --overwrite).
  assert runs.seg_identity(_toy_config("steps", steps=600, epochs=15)) != runs.seg_identity(config)
  epochs = runs.seg_identity(_toy_config("epochs", steps=300, epochs=15))["seg"]
  assert epochs["budget"] == "epochs" and epochs["epochs"] == 15 and "steps" not in epochs
