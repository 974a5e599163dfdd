"""The privacy audit end to end on phantom slices (dfgm_jax/privacy/audit.py, scan.py).

One workdir W for the module: the shared phantom slices (W/slices) and a
cut-paste synthetic set of TCIA (W/synthetic, made by the synthesis stage:
real salted pseudonyms, private tumors pasted verbatim), since TCIA is the
phantom's center with held-out slices. Membership is off here (it has its own
tests); the binary's run is slow.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dfgm_jax import errors

CENTER = "TCIA"
REGIONS = ("full", "ring", "background")


def _config():
  from configs import tiny
  config = tiny.get_config()
  config.train.center = CENTER
  config.synthesis.backend = "pixels"
  config.synthesis.mode = "cutpaste"
  return config


@pytest.fixture(scope="module")
def workdir(preprocessed_2020, tmp_path_factory):
  from data_pipeline import slice_sets
  from dfgm_jax.synthesis import stage
  w = str(tmp_path_factory.mktemp("audit") / "W")  # fresh: no W/private yet.
  shutil.copytree(preprocessed_2020[0], os.path.join(w, "slices"))
  result = stage.run(_config(), w, slice_sets.SliceData(os.path.join(w, "slices")),
                     baseline=True)
  shutil.copytree(result["paths"]["synthetic set"], os.path.join(w, "synthetic"))
  return w


def _audit(w, out, candidates=None, **settings):
  from data_pipeline import slice_sets
  from dfgm_jax.privacy import audit
  inputs = audit.workdir_inputs(_config(), w, slice_sets.SliceData, candidates=candidates,
                                out_dir=out)
  return audit.run(_config(), inputs, out,
                   settings=audit.Settings(membership=False, **settings))


def test_training_split_as_candidates_is_all_copies(workdir, tmp_path):
  out = _audit(workdir, str(tmp_path / "p"), f"{workdir}/slices:{CENTER}_train")
  n = out["candidates"]["n"]
  assert n == out["n_training"] > 0
  for region in (*REGIONS, "tumor"):
    r = out["regions"][region]
    assert r["dcr"]["fraction_zero"] == 1.0 and r["dcr"]["fraction_below"] == 1.0
    assert r["nn_ratio"]["fraction_flagged"] == 1.0
    assert r["carlini"]["fraction_below"] == 1.0
  src = out["source"]
  assert src["n_with_source"] == n and src["matched_by"].startswith("case id")
  assert all(src[f"nearest_is_source_{r}"] == 1.0 for r in REGIONS)
  assert src["ring"]["fraction_replicated"] == 1.0
  assert {out["verdicts"][f"region {r}"]["status"] for r in REGIONS} == {"copies"}
  assert out["overall"] == "fail"


def test_independent_slices_are_not_copies(workdir, tmp_path):
  # Another center's patients: real slices no model saw. The phantom's
  # held-out slices are too few patients to calibrate a threshold: the copy
  # rules still run (none is met), and the verdict says what to add instead
  # of "ok" or "warning".
  out = _audit(workdir, str(tmp_path / "p"), f"{workdir}/slices:CBICA_train")
  manifest = json.load(open(os.path.join(workdir, "slices", "manifest.json")))
  n_held = manifest["splits"][f"{CENTER}_test"]["num_cases"]
  for region in REGIONS:
    r = out["regions"][region]
    assert r["dcr"]["fraction_zero"] == 0.0 and r["copies"]["n"] == 0
    assert r["nn_ratio"]["fraction_flagged"] == 0.0
    assert 0.5 < r["dcr"]["candidate_median"] / r["dcr"]["heldout_median"] < 2.0
    assert r["reference"]["too_small"] and r["reference"]["n_patients"] == n_held < 5
    verdict = out["verdicts"][f"region {region}"]
    assert verdict["status"] == "reference too small", verdict["text"]
    assert "add held-out patients" in verdict["text"]
  assert out["source"]["n_with_source"] == 0
  assert out["overall"] == "not shown"
  assert out["summary"]["regions"]["full"]["heldout_patients"] == out["regions"]["full"][
      "reference"]["n_patients"]


def test_synthetic_set_outputs_reuse_and_refusal(workdir):
  from dfgm_jax.privacy import audit
  out_dir = os.path.join(workdir, "privacy")
  out = _audit(workdir, out_dir)
  assert not out["reused"] and out["candidates"]["kind"] == "synthetic set"
  # The tumor is pasted verbatim at its place: copied by design, said so.
  tumor = out["regions"]["tumor"]
  assert tumor["dcr"]["fraction_zero"] == 1.0
  assert out["verdicts"]["region tumor"]["status"] == "by design"
  src = out["source"]
  assert src["n_with_source"] == out["candidates"]["n"]  # through the salt.
  assert src["nearest_is_source_tumor"] == 1.0
  # The set's files hold no private identifier (the binary shards included).
  scan = out["scan"]
  assert scan["hits"] == [] and scan["targets"]["synthetic set"] == "scanned"
  assert scan["files_scanned"] >= 6 and scan["tokens"]["case id"] >= 8
  assert out["verdicts"]["shared files"]["status"] == "ok"
  # Every background is a public-origin slice (matched through the salt).
  assert out["backgrounds"]["fraction_not_public"] == 0.0
  assert out["backgrounds"]["public"] == out["candidates"]["n"]
  assert out["verdicts"]["backgrounds"]["status"] == "ok"
  assert out["summary"]["background_fraction_not_public"] == 0.0

  md = open(os.path.join(out_dir, audit.PRIVACY_MD)).read()
  for line in ("**Overall:", "- **by design**: tumor: copied by design",
               "- **ok**: shared files: clean", "- **skipped**: membership G1",
               "- **skipped**: G2 sample test"):
    assert line in md
  saved = json.load(open(os.path.join(out_dir, audit.PRIVACY_JSON)))
  assert saved == {k: v for k, v in out.items() if k not in ("paths", "reused")}
  shared = open(os.path.join(out_dir, audit.SUMMARY_JSON)).read()
  assert json.loads(shared) == saved["summary"]
  manifest = json.load(open(os.path.join(workdir, "slices", "manifest.json")))
  for case in manifest["cases"]:
    assert case["case_id"] not in shared
  assert workdir not in shared and "/" not in shared
  assert os.path.exists(os.path.join(out_dir, audit.FIGURE))
  # G2's card keeps the summary (train/g2.py audit_for_card; its own test below).
  from dfgm_jax.train import g2
  record = json.load(open(os.path.join(out_dir, audit.RECORD)))
  assert record["summary_sha256"] == g2.summary_sha256(saved["summary"])

  mtimes = {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in os.listdir(out_dir)}
  again = _audit(workdir, out_dir)
  assert again["reused"] and again["summary"] == saved["summary"]
  assert {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in mtimes} == mtimes
  with pytest.raises(errors.RunMismatch, match="settings.carlini_n") as refused:
    _audit(workdir, out_dir, carlini_n=10)
  # The remedy names the audit's own flags: its output folder is --out.
  assert str(refused.value).endswith("or use another --out.")
  with pytest.raises(errors.RunMismatch, match="candidate_split"):
    _audit(workdir, out_dir, f"{workdir}/slices:{CENTER}_train")


def test_scan_catches_planted_ids_in_a_copied_set_and_png_metadata(workdir, tmp_path):
  from PIL import Image, PngImagePlugin
  from dfgm_jax.privacy import scan
  manifest = json.load(open(os.path.join(workdir, "slices", "manifest.json")))
  case_id = manifest["cases"][0]["case_id"]
  copy = str(tmp_path / "shared_set")
  shutil.copytree(os.path.join(workdir, "synthetic"), copy)
  shard = next(os.path.join(d, f) for d, _, fs in os.walk(copy) for f in fs
               if ".tfrecord-" in f)
  with open(shard, "ab") as f:
    f.write(b"\x00\x07" + case_id.encode() + b"\x00")
  info = PngImagePlugin.PngInfo()
  info.add_text("Title", f"slice of {case_id}", zip=True)  # compressed: zTXt.
  png = os.path.join(copy, "preview.png")
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, pnginfo=info)
  assert case_id.encode() not in open(png, "rb").read()
  with open(os.path.join(copy, "notes.json"), "w") as f:
    json.dump({"from": os.path.join(workdir, "slices")}, f)

  tokens = scan.private_tokens(manifest, paths=[workdir])
  out = scan.scan({"copy": copy}, tokens)
  hits = {(h["file"], h["matched"]): h for h in out["hits"]}
  rel = os.path.relpath(shard, str(tmp_path))
  assert hits[(rel, case_id)]["kind"] == "case id"
  assert hits[(rel, case_id)]["where"] == "raw bytes"
  png_hit = hits[("shared_set/preview.png", case_id)]
  assert png_hit["where"] == "PNG zTXt chunk 'Title'"
  assert hits[("shared_set/notes.json", workdir)]["kind"] == "path"
  assert len({h["file"] for h in out["hits"]}) == 3
  # The center's public name, in every split name and example, is no hit.
  assert not any(h["matched"] == CENTER for h in out["hits"])
  clean = scan.scan({"set": os.path.join(workdir, "synthetic")}, tokens)
  assert clean["hits"] == [] and clean["files_scanned"] == out["files_scanned"] - 2


@pytest.mark.slow
def test_binary_flags_the_training_split(workdir, tmp_path):
  out = str(tmp_path / "p")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.privacy_audit", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--candidates={workdir}/slices:{CENTER}_train",
       f"--center={CENTER}", f"--out={out}", "--nomembership"],
      cwd=root, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["overall"] == "fail"
  assert all(summary["regions"][r]["fraction_exact_copies"] == 1.0 for r in REGIONS)
  assert "[copies] full: COPIES, 100.0 %" in proc.stdout


# --- Membership: verdicts and rows from simulated attacks -------------------------


def _membership(shift, n_members=40, n_nonmembers=16, per_patient=2, calibrated_shift=None,
                region="ring", seed=0, area_shift=0.0):
  """An audit_model-shaped result of simulated scores: members lower by `shift`
  standard deviations (the calibrated attack by `calibrated_shift`), their
  tumors log-area_shift larger."""
  from scipy import stats
  from dfgm_jax.privacy import attack_stats
  rng = np.random.default_rng(seed)
  gm = np.arange(n_members) // per_patient
  gh = 1000 + np.arange(n_nonmembers) // per_patient
  area_m = rng.lognormal(5.0 + area_shift, 0.4, n_members)
  area_h = rng.lognormal(5.0, 0.4, n_nonmembers)
  kw = dict(member_groups=gm, nonmember_groups=gh, n_boot=300)

  def normal(n, mean):  # evenly spread quantiles, shuffled: the AUC is about Phi(d / 2^.5).
    return rng.permutation(stats.norm.ppf((np.arange(n) + 0.5) / n)) + mean

  def attack(d):
    m, h = normal(n_members, -d), normal(n_nonmembers, 0.0)
    return attack_stats.evaluate(m, h, member_area=area_m, nonmember_area=area_h, **kw)

  res = {"loss": attack(shift), "size": attack_stats.size_baseline(area_m, area_h, **kw),
         "settings": {"score_region": region},
         "calibrated": ({"skipped": "no G2 export to calibrate with"}
                        if calibrated_shift is None else attack(calibrated_shift))}
  return json.loads(json.dumps(res))


def test_membership_verdict_words_fit_the_power():
  from dfgm_jax.privacy import audit
  # 40 training slices of 20 patients against 16 held-out slices of 8: a
  # blind attack's interval holds 0.5 and 0.6 alike.
  wide = _membership(0.0)
  lo, hi = wide["loss"]["matched_auc_interval"]
  assert lo < 0.5 and hi > audit.LEAK_AUC
  status, text = audit.membership_verdict("G1", wide)
  assert status == "inconclusive"
  assert text.startswith("membership G1: not detected at this sample size")
  assert "no calibrated attack (no G2 export to calibrate with)" in text
  # Too little power shows no privacy: never an overall pass.
  assert audit.overall({"membership G1": {"status": status},
                        "shared files": {"status": "ok"}}) == "not shown"
  assert audit.overall({"shared files": {"status": "ok"}}) == "pass"
  # Many patients, no signal: the interval rules a leak-sized AUC out.
  big = _membership(0.0, n_members=800, n_nonmembers=800, per_patient=2, seed=1)
  assert audit.membership_verdict("G2", big)[0] == "ok"
  # A clear signal: detected for G1 (not shared), a leak for G2 (shared).
  strong = _membership(2.0, n_members=80, n_nonmembers=80, seed=2)
  status, text = audit.membership_verdict("G1", strong)
  assert status == "warning" and "DETECTED, the loss attack's size-matched AUC" in text
  status, text = audit.membership_verdict("G2", strong)
  assert status == "leak" and text.startswith("membership G2: LEAK")


def test_no_membership_verdict_from_too_few_patients_or_unmatched_sizes():
  from dfgm_jax.privacy import audit
  # The demo's reference: held-out slices of 2 patients. Even a strong
  # signal may be those 2 patients' difference from the rest.
  few = _membership(3.0, n_nonmembers=16, per_patient=8)
  assert few["loss"]["n_nonmember_patients"] == 2
  assert few["loss"]["matched_auc_interval"][0] > 0.5
  status, text = audit.membership_verdict("G2", few)
  assert status == "inconclusive" and "too few patients to judge" in text
  assert "2 held-out patients" in text and "add held-out patients" in text
  # Members' tumors all larger, none of like size: the plain AUC may be size.
  apart = _membership(3.0, n_members=60, n_nonmembers=60, area_shift=3.0)
  assert apart["loss"]["matched_auc"] is None
  assert apart["loss"]["auc_interval"][0] > 0.5 and apart["size"]["auc"] < 0.1
  status, text = audit.membership_verdict("G2", apart)
  assert status == "inconclusive" and "may be size, not membership" in text


def test_a_size_matched_auc_of_few_patients_does_not_decide():
  """Pairs from 2 patients all won give the interval [1, 1]: it looks
  certain and rests on 2 patients, so the plain AUC is read instead."""
  from dfgm_jax.privacy import audit
  res = _membership(0.0, n_members=80, n_nonmembers=80, seed=4)
  assert res["loss"]["auc_interval"][0] < 0.5 < res["loss"]["auc_interval"][1]
  won = {"matched_auc": 1.0, "matched_auc_interval": [1.0, 1.0]}
  res["loss"].update(won, matched_member_patients=5, matched_nonmember_patients=5)
  assert audit.membership_verdict("G1", res)[0] == "warning"
  res["loss"].update(matched_member_patients=2)
  assert res["loss"]["auc_interval"][1] < audit.LEAK_AUC
  assert audit.membership_verdict("G1", res)[0] == "ok"  # the plain AUC's verdict.


def test_the_stronger_attack_drives_the_membership_verdict():
  from dfgm_jax.privacy import audit
  res = _membership(0.0, n_members=80, n_nonmembers=80, calibrated_shift=2.0, seed=3)
  assert res["loss"]["matched_auc_interval"][0] < 0.5
  status, text = audit.membership_verdict("G1", res)
  assert status == "warning" and "the calibrated attack's size-matched AUC" in text
  assert "loss attack: AUC" in text and "calibrated attack: AUC" in text


def test_membership_tpr_names_the_fpr_it_reached():
  from dfgm_jax.privacy import audit
  _, text = audit.membership_verdict("G1", _membership(0.5, n_nonmembers=16))
  assert "at 0 of 16 held-out slices wrongly flagged (FPR 0.0 %" in text
  assert "1.0 % FPR is not reachable with 16 held-out slices" in text
  assert "1 of 16 = 6.2 %" in text and "a blind score gets TPR 5.9 %" in text
  assert "at 1 % FPR" not in text
  _, text = audit.membership_verdict("G1", _membership(0.5, n_nonmembers=200))
  assert "at 2 of 200 held-out slices wrongly flagged (FPR 1.0 %" in text
  assert "not reachable" not in text


def test_membership_rows_of_the_summary_and_markdown(workdir):
  from dfgm_jax.privacy import audit
  report = _audit(workdir, os.path.join(workdir, "privacy"))  # reused when made already.
  g1 = _membership(0.3, calibrated_shift=0.6)
  g1["calibrated"]["reference"] = {"about": audit.G2_AS_REFERENCE}
  g2 = {**_membership(0.0, region="dilated"), "about": audit.G2_TRAINED_ON}
  measured = {**report, "membership": {"G1": g1, "G2": g2}}
  md = audit.markdown(measured)
  assert "- G1, scored on the ring region (the one its loss weighed): 40 training slices" in md
  assert "- G2, scored on the dilated region (the one its loss weighed)" in md
  assert "it saw the members' tumors but never their rings or backgrounds" in md
  assert "but on the synthetic set whose tumors are the members' tumors" in md
  assert "  - calibrated attack: not run (no G2 export" in md  # G2's own.
  assert "tumor area alone as the score: AUC" in md
  assert "saw neither" not in md and "excess" not in md
  measured["verdicts"] = audit.verdicts(measured)
  rows = audit.summary(measured)["membership"]
  assert rows["G1"]["score_region"] == "ring" and rows["G2"]["score_region"] == "dilated"
  assert set(rows["G1"]) == {"score_region", "tumor_area_auc", "tumor_area_auc_interval",
                             "loss", "calibrated"}
  assert "calibrated" not in rows["G2"]
  assert rows["G1"]["loss"]["false_positives"] == 0
  assert rows["G1"]["loss"]["auc_interval"] == g1["loss"]["auc_interval"]
  assert "/" not in json.dumps(rows)  # G2's card drops strings that look like paths.
  md = audit.markdown({**report, "membership": {"G1": g1, "G2": {"skipped": "no export"}}})
  assert "- G2: skipped (no export)" in md


def _g2_stand_in(workdir, out_dir):
  """A stand-in public synthetic set (CBICA_synthetic) for G2's card."""
  from tests import test_g2
  return test_g2.stand_in_synthetic_set(os.path.join(workdir, "slices"), out_dir)


@pytest.mark.slow
@pytest.mark.ci_slow
def test_membership_checks_score_each_model_on_its_region_and_calibrate_g1(
    workdir, tmp_path, monkeypatch):
  """Fresh G1 and G2 exports (untrained: the attacks have nothing to find):
  G1 on the ring with G2 as its reference, G2 on the dilated tumor it
  trained on, without a reference, and both said truthfully."""
  import dataclasses
  from data_pipeline import slice_sets
  from dfgm_jax import model_io
  from dfgm_jax.diffusion import denoiser
  from dfgm_jax.privacy import audit
  from dfgm_jax.privacy import membership
  from tests import test_local_synthesis
  # One timestep and seed: one network call per batch (the wiring is tested
  # here, the score in tests/test_membership.py).
  monkeypatch.setattr(membership, "TIMESTEPS", (200,))
  monkeypatch.setattr(membership, "SEEDS", (0,))
  config = _config()
  g1 = denoiser.Denoiser.init(config)
  g1_dir = model_io.export(g1.params, config, 0, str(tmp_path / "model"), loss_region="ring")
  stand_in = _g2_stand_in(workdir, str(tmp_path / "public"))
  # pylint: disable=protected-access
  g2_dir = test_local_synthesis._g2_export(
      test_local_synthesis._config(), os.path.join(workdir, "slices"), stand_in,
      str(tmp_path / "g2_model"))
  # pylint: enable=protected-access
  inputs = dataclasses.replace(
      audit.workdir_inputs(config, workdir, slice_sets.SliceData), g1_dir=g1_dir,
      g2_dir=g2_dir)
  real = slice_sets.SliceData(os.path.join(workdir, "slices"))
  train, heldout = real.load_split(f"{CENTER}_train"), real.load_split(f"{CENTER}_test")
  out = audit.membership_checks(config, inputs, train, heldout, audit.Settings())
  assert list(out) == ["G1", "G2"]
  assert out["G1"]["settings"]["score_region"] == "ring"
  assert out["G2"]["settings"]["score_region"] == "dilated"
  cal = out["G1"]["calibrated"]
  assert cal["reference"]["loss_region"] == "dilated"
  assert cal["reference"]["about"] == audit.G2_AS_REFERENCE
  assert len(out["G1"]["scores"]["reference_members"]) == len(train["image"])
  assert "skipped" in out["G2"]["calibrated"] and out["G2"]["about"] == audit.G2_TRAINED_ON
  assert json.loads(json.dumps(out)) == out
  # The phantom's held-out slices are too few patients': no verdict, said
  # why. (Without that rule this untrained G2 read as a leak: every member's
  # tumor is larger than every held-out one, and its losses follow size.)
  assert out["G1"]["loss"]["n_nonmember_patients"] < audit.MIN_PATIENTS
  for name in out:
    status, text = audit.membership_verdict(name, out[name])
    assert status == "inconclusive" and "too few patients to judge" in text, text


def _region_result(fraction_below, exceeds, n_patients=8, copies=0):
  """A region's result as memorization.region_audit gives it (what the verdict reads)."""
  calibrated = {"fraction_below": fraction_below, "exceeds": exceeds,
                "p_value": 0.001 if exceeds else 0.4, "confidence": 0.99}
  return {
      "dcr": {**calibrated, "fraction_zero": 0.0, "quantile": 0.05, "threshold": 0.2,
              "threshold_low": 0.18, "threshold_high": 0.22,
              "fraction_below_interval": [fraction_below / 2, fraction_below * 2]},
      "carlini": calibrated, "nn_ratio": {"fraction_flagged": 0.0},
      "copies": {"n": copies, "fraction": copies / 100, "n_exact": 0, "n_margin": copies,
                 "n_ratio": 0, "copy_margin": 0.5},
      "reference": {"n_patients": n_patients, "n_heldout": 8 * n_patients,
                    "min_patients": 5, "too_small": n_patients < 5}}


def test_a_matched_background_warning_says_why():
  from dfgm_jax.privacy import audit
  close = _region_result(0.3, exceeds=True)
  status, text = audit.region_verdict("background", close, synthetic=True)
  assert status == "warning" and "matching chose" in text and "permutation p" in text
  # A real split has no matching to explain it; the ring was generated, not matched.
  assert "matching" not in audit.region_verdict("background", close)[1]
  assert "matching" not in audit.region_verdict("ring", close, synthetic=True)[1]
  # Below the threshold as often as chance allows: ok.
  assert audit.region_verdict("background", _region_result(0.1, exceeds=False),
                              synthetic=True)[0] == "ok"
  # A near copy is "copies" whatever the rest; a small reference never "ok".
  assert audit.region_verdict("ring", _region_result(0.0, False, copies=2))[0] == "copies"
  small = audit.region_verdict("ring", _region_result(0.0, False, n_patients=2))
  assert small[0] == "reference too small" and "2 held-out patients" in small[1]
  assert audit.region_verdict("ring", _region_result(0.0, False, n_patients=2,
                                                      copies=1))[0] == "copies"


def test_g2_sample_test_runs_on_a_generate_mode_set_only(workdir, tmp_path):
  import dataclasses
  from data_pipeline import slice_sets
  from dfgm_jax.privacy import audit
  inputs = audit.workdir_inputs(_config(), workdir, slice_sets.SliceData)
  train = slice_sets.load_split(os.path.join(workdir, "slices"), f"{CENTER}_train")
  public = slice_sets.SliceData(os.path.join(workdir, "synthetic"))
  # A stand-in for G2's generate-mode samples: S itself, re-labelled.
  local_dir = str(tmp_path / "local")
  shutil.copytree(os.path.join(workdir, "synthetic"), local_dir)
  summary = json.load(open(os.path.join(local_dir, "summary.json")))
  for mode, expect in (("cutpaste", "skipped"), ("anomalydiffusion", "ok")):
    with open(os.path.join(local_dir, "summary.json"), "w") as f:
      json.dump({**summary, "mode": mode}, f)
    res = audit.g2_sample_check(
        dataclasses.replace(inputs, local=slice_sets.SliceData(local_dir), public=public),
        train, 2, 0, audit.Settings())
    assert audit.g2_sample_verdict(res)[0] == expect
  # Every sample is in S: distance 0 to S, never closer to the private slices.
  g = res["generated"]
  assert g["public_median"] == 0.0 and g["fraction_closer_to_private"] == 0.0
  assert g["private_median"] > 0.0 and res["n_samples"] == res["n_public"]
  assert audit.g2_sample_verdict(
      {"generated": {**g, "public_median": 1.0}})[0] == "warning"


def test_backgrounds_are_checked_through_the_salt(workdir):
  from data_pipeline import slice_sets
  from dfgm_jax.privacy import audit
  from dfgm_jax.synthesis import pipeline
  from dfgm_jax.synthesis import stage
  real = slice_sets.SliceData(os.path.join(workdir, "slices"))
  cands = slice_sets.load_split(os.path.join(workdir, "synthetic"), f"{CENTER}_synthetic")
  salt = stage.read_salt(workdir)
  res = audit.background_check(cands, real.manifest, salt)
  # Made on the default `healthy` split: every background is public-origin.
  n = len(cands["image"])
  assert (res["n_backgrounds"], res["public"], res["fraction_not_public"]) == (n, n, 0.0)
  assert audit.background_verdict(res)[0] == "ok"
  # A private patient's slice planted as a background is a leak.
  key, z = real.manifest["slices"][f"{CENTER}_healthy"][0]
  planted = dict(cands, healthy=[pipeline.salted_hash(f"{key}/{z:03d}", salt)]
                 + list(cands["healthy"][1:]))
  res = audit.background_check(planted, real.manifest, salt)
  assert (res["private"], res["not_public"]) == (1, [0])
  assert res["fraction_not_public"] == pytest.approx(1 / n)
  status, text = audit.background_verdict(res)
  assert status == "leak" and "not public-origin" in text
  assert audit.overall({"backgrounds": {"status": status}}) == "fail"
  # A test patient's tumor-free slice (<center>_test_healthy, the evaluation's
  # false positives) is a private patient's too.
  test_healthy = [s for name in real.manifest["slices"] if name.endswith("_test_healthy")
                  for s in real.manifest["slices"][name]]
  assert test_healthy
  key, z = test_healthy[0]
  planted = dict(cands, healthy=[pipeline.salted_hash(f"{key}/{z:03d}", salt)]
                 + list(cands["healthy"][1:]))
  assert audit.background_check(planted, real.manifest, salt)["private"] == 1
  # A hash of nothing the preprocessing wrote: unknown, not public either.
  res = audit.background_check(dict(cands, healthy=["0" * 16] * n), real.manifest, salt)
  assert res["unknown"] == n and res["fraction_not_public"] == 1.0
  # A real split has no backgrounds; without the salt nothing can be matched.
  assert "skipped" in audit.background_check({"image": cands["image"]}, real.manifest, salt)
  assert "skipped" in audit.background_check(cands, real.manifest, None)


def test_record_names_the_audited_set_for_g2s_card(workdir, tmp_path):
  from dfgm_jax.privacy import audit
  from dfgm_jax.train import g2
  synthetic = os.path.join(workdir, "synthetic")
  mine = g2.set_fingerprint(synthetic, json.load(open(os.path.join(synthetic,
                                                                   "manifest.json"))))
  # G2's inputs as its card lists them: the synthetic set it was trained on.
  inputs = {"inputs": [{"role": "tumor", "set_fingerprint": mine}]}
  own = os.path.join(workdir, "privacy")
  _audit(workdir, own)  # reused when made already.
  record = json.load(open(os.path.join(own, audit.RECORD)))
  assert record["candidates"]["kind"] == "synthetic set"
  assert record["candidates"]["set_fingerprint"] == mine
  summary, _ = g2.audit_for_card(os.path.join(own, audit.PRIVACY_JSON), inputs, None)
  assert summary == json.load(open(os.path.join(own, audit.SUMMARY_JSON)))
  # The README's sanity check, the training split audited into the same kind
  # of folder, comes out "fail" and is never put on G2's card.
  train = str(tmp_path / "train")
  assert _audit(workdir, train, f"{workdir}/slices:{CENTER}_train")["overall"] == "fail"
  summary, note = g2.audit_for_card(os.path.join(train, audit.PRIVACY_JSON), inputs, None)
  assert summary is None and f"real split '{CENTER}_train'" in note


@pytest.mark.slow
@pytest.mark.ci_slow
def test_a_killed_overwrite_leaves_no_finished_looking_audit(workdir, tmp_path):
  from data_pipeline import slice_sets
  from dfgm_jax.privacy import audit
  out = str(tmp_path / "p")
  _audit(workdir, out)
  assert os.path.exists(os.path.join(out, audit.SUMMARY_JSON))

  class Killed(Exception):
    pass

  def progress(message):
    if "membership" in message:  # after the region checks, before any write.
      raise Killed(message)

  inputs = audit.workdir_inputs(_config(), workdir, slice_sets.SliceData, out_dir=out)
  with pytest.raises(Killed):
    audit.run(_config(), inputs, out, settings=audit.Settings(membership=False),
              overwrite=True, progress=progress)
  # No record, and no output of the earlier audit that would pass for this one.
  assert sorted(os.listdir(out)) == []
