"""dfgm_jax/report.py: W/report.md from what the stages wrote."""

import json
import os

from dfgm_jax import report


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def test_report_gathers_the_stages_files_with_links_relative_to_the_workdir(tmp_path):
  w = str(tmp_path / "W")
  _write(os.path.join(w, "slices", "manifest.json"), json.dumps({
      "image_size": 64, "modalities": ["t2"],
      "splits": {"CBICA_train": {"num_slices": 54, "num_cases": 7}}}))
  _write(os.path.join(w, "g1", "metrics.jsonl"),
         json.dumps({"step": 10, "loss": 0.5}) + "\n" + json.dumps({"step": 20, "loss": 0.25}) + "\n")
  _write(os.path.join(w, "synthetic", "summary.json"), json.dumps({
      "mode": "dfgm", "synthetic_total": 108, "centers": {"CBICA": {"synthetic": 108}},
      "images_per_s": 2.6}))
  _write(os.path.join(w, "baselines", "cutpaste", "set", "summary.json"), json.dumps({
      "mode": "cutpaste", "synthetic_total": 108, "centers": {}, "images_per_s": 1e3}))
  _write(os.path.join(w, "eval", "results.md"),
         "# Downstream\n\n| run | Dice |\n\n## Figures\n\n![d](figures/dice_per_run.png)\n")
  _write(os.path.join(w, "eval", "quality.json"), json.dumps({"sets": {"dfgm": {}}}))
  path = report.write(w, quality_table=lambda q: f"| quality of {sorted(q['sets'])} |")
  text = open(path).read()
  assert path == os.path.join(w, "report.md")
  assert "| CBICA_train | 54 | 7 |" in text
  assert "| G1 (dfgm) | g1 | central | 20 | 0.2500 |" in text  # the last logged row.
  assert "| dfgm (SHAREABLE) | synthetic | dfgm | 108 |" in text
  assert "| cutpaste (private, evaluation only) | baselines/cutpaste/set |" in text
  # results.md's sections nest under the report's; its links become W-relative.
  assert "### Figures" in text and "](eval/figures/dice_per_run.png)" in text
  assert "# Downstream" not in text
  assert "| quality of ['dfgm'] |" in text
  assert str(tmp_path) not in text


def test_a_stage_that_did_not_run_is_said_not_invented(tmp_path):
  text = report.build(str(tmp_path))
  for line in ("No preprocessed slices", "No diffusion model was trained",
               "No synthetic set was made", "The evaluation did not run",
               "The quality table was not computed"):
    assert line in text


def test_the_privacy_section_shows_the_audit_verdicts_and_links_its_files(tmp_path):
  w = str(tmp_path / "W")
  assert "The privacy audit did not run" in report.build(w)
  summary = {"center": "TCIA", "candidates": "synthetic set", "n_candidates": 20,
             "n_training": 10, "n_heldout": 5, "overall": "warning",
             "regions": {"ring": {"dcr_median": 0.2, "dcr_heldout_median": 0.25,
                                  "dcr_fraction_below": 0.3, "fraction_exact_copies": 0.0,
                                  "nn_ratio_fraction_flagged": 0.0,
                                  "carlini_fraction_below": 0.1}}}
  _write(os.path.join(w, "privacy", "privacy.json"), json.dumps({
      "summary": summary, "figure": "closest_pairs.png",
      "verdicts": {"region tumor": {"status": "by design", "text": "tumor: copied by design"}}}))
  text = report.build(w)
  assert "## Privacy audit" in text and "**Overall: WARNING**" in text
  assert "- **by design**: tumor: copied by design" in text
  assert "| ring | 0.2000 | 0.2500 | 30.0% | 0.0% | 0.0% | 10.0% |" in text
  assert "](privacy/privacy.md)" in text and "](privacy/closest_pairs.png)" in text


def test_the_decentralized_stages_are_reported(tmp_path):
  w = str(tmp_path / "W")
  _write(os.path.join(w, "g1", "metrics.jsonl"), json.dumps(
      {"step": 150, "round": 3.0, "loss": 0.08, "CBICA/loss": 0.085, "TCIA/loss": 0.076}))
  _write(os.path.join(w, "g2", "metrics.jsonl"), json.dumps({"step": 150, "loss": 0.074}))
  _write(os.path.join(w, "local", "synthetic", "summary.json"), json.dumps({
      "mode": "dfgm", "synthetic_total": 108, "centers": {"CBICA": {"synthetic": 108}},
      "images_per_s": 2.7}))
  text = report.build(w)
  # Steps in all: 150 per client x 2 clients.
  assert ("| G1 (dfgm) | g1 | federated, 3 rounds of 50 local steps over CBICA, TCIA "
          "(150 steps per client) | 300 | 0.0800 |") in text
  assert "| G2 (shared; export g2_model/ SHAREABLE) | g2 | shareable data only | 150 |" in text
  assert "anomalydiffusion model trained" not in text  # no such model here.
  assert "| local synthesis with G2 (the institute's own) | local/synthetic | dfgm | 108 |" in text
  assert "except `synthetic/`, `g2_model/` and `privacy/summary.json`" in text


def test_the_models_steps_are_counted_alike_for_federated_and_central_training(tmp_path):
  w = str(tmp_path / "W")
  # The demo's numbers: G1 federated, 3 rounds of 50 local steps over two
  # clients (150 per client); the anomalydiffusion model central, 300 steps.
  _write(os.path.join(w, "g1", "metrics.jsonl"), json.dumps(
      {"step": 150, "round": 3.0, "loss": 0.08, "CBICA/loss": 0.085, "TCIA/loss": 0.076}))
  ad = os.path.join(w, "baselines", "anomalydiffusion", "g1", "metrics.jsonl")
  _write(ad, json.dumps({"step": 300, "loss": 0.07}))
  text = report.build(w)
  assert "| anomalydiffusion | baselines/anomalydiffusion/g1 | central | 300 | 0.0700 |" in text
  assert "The anomalydiffusion model trained 300 steps, G1 300: the same budget" in text
  assert "the same number of steps" not in text
  _write(ad, json.dumps({"step": 200, "loss": 0.07}))
  assert "trained 200 steps, G1 300: not the same budget" in report.build(w)
