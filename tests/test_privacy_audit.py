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
  with pytest.raises(errors.RunMismatch, match="settings.carlini_n"):
    _audit(workdir, out_dir, carlini_n=10)
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


def test_markdown_names_g2_the_reference_for_g1s_membership(workdir):
  from dfgm_jax.privacy import audit
  report = _audit(workdir, os.path.join(workdir, "privacy"))  # reused when made already.
  measured = {"G1": {"auc": 0.71, "tpr_at_1pct_fpr": 0.1},
              "G2": {"auc": 0.58, "tpr_at_1pct_fpr": 0.0}}
  md = audit.markdown({**report, "membership": measured})
  assert "- G1: AUC 0.710" in md and "- G2: AUC 0.580" in md
  assert "G1's excess over it (+0.130)" in md
  # With G2 not measured there is no reference to name.
  md = audit.markdown({**report, "membership": {**measured, "G2": {"skipped": "no export"}}})
  assert "excess" not in md and "- G2: skipped (no export)" in md


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
