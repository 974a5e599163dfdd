"""The pipeline's stages in process (launch/pipeline.py), end to end on the tiny config."""

import json
import os

import pytest

from launch import pipeline


def test_stages_are_named_in_order():
  assert [s.name for s in pipeline.STAGES] == [
      "phantom", "preprocess", "train G1", "export G1", "synthesize",
      "train baseline model", "synthesize baselines", "train G2", "local synthesis",
      "evaluate", "synthesis quality", "privacy audit", "report"]


def test_a_synthesized_center_the_evaluation_does_not_read_is_refused_first(tmp_path):
  from configs import real_cpu
  from dfgm_jax import errors
  config = real_cpu.get_config()
  pipeline.check_synthesized_center(config)  # CBICA synthesized, CBICA first.
  config.train.center = "TCIA"
  with pytest.raises(errors.ConfigError, match=r"config.train.center=TCIA: .*CBICA_synthetic"):
    pipeline.run_stages(pipeline.Run(config, str(tmp_path)))
  assert not os.listdir(tmp_path)  # before any stage.
  config.synthesis.centers = "CBICA,TCIA"
  pipeline.check_synthesized_center(config)
  config.data.centers = "auto"  # center 1 known only from the data.
  config.synthesis.centers = "TCIA"
  pipeline.check_synthesized_center(config)


def _tiny(num_steps: int, sampler_steps: int):
  """The tiny config on phantom slices, a few training and sampler steps."""
  from configs import tiny
  config = tiny.get_config()
  config.train.reader = "grain"
  config.train.num_steps = num_steps
  config.synthesis.backend = "pixels"
  config.sampler.steps = sampler_steps
  config.sampler.resamples = 1
  config.sampler.batch_size = 4
  return config


@pytest.mark.slow
def test_pipeline_runs_every_stage_in_process_and_reuses_them(tmp_path):
  config = _tiny(num_steps=10, sampler_steps=5)
  run = pipeline.Run(config, str(tmp_path), num_workers=1)
  out = pipeline.run_stages(run)
  assert list(out) == [s.name for s in pipeline.STAGES]
  assert out["train G1"]["G1 step"] == 10 and out["export G1"]["G1 export step"] == 10
  summary = json.loads((tmp_path / "synthetic" / "summary.json").read_text())
  assert summary["model_step"] == 10 and summary["synthetic_total"] == out[
      "synthesize"]["synthetic pairs"] > 0
  assert os.path.exists(out["synthesize"]["figure (private)"])
  # The tiny config's one baseline: a private cut-paste set, no model of its own.
  assert out["train baseline model"] == {}
  cutpaste = json.loads((tmp_path / "baselines" / "cutpaste" / "set" / "summary.json")
                        .read_text())
  assert cutpaste["mode"] == "cutpaste"
  assert cutpaste["synthetic_total"] == summary["synthetic_total"]  # same pairs.
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert "D_cutpaste" in results["runs"] and "D" in results["runs"]
  report = (tmp_path / "report.md").read_text()
  assert out["report"]["report"] == str(tmp_path / "report.md")
  for section in ("## Data", "## Synthetic sets", "## Does the synthetic data help?",
                  "| D_cutpaste |", "## Synthesis quality", "| cutpaste |"):
    assert section in report
  assert str(tmp_path) not in report  # links relative to the workdir.
  # A second run reuses every stage: nothing is rewritten.
  mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")}
  again = pipeline.run_stages(pipeline.Run(config, str(tmp_path), num_workers=1))
  assert again["synthesize"]["synthetic pairs"] == summary["synthetic_total"]
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


@pytest.mark.slow
def test_the_decentralized_stages_run_when_turned_on(tmp_path):
  config = _tiny(num_steps=6, sampler_steps=4)
  config.evaluation.baselines = ()
  config.decentralized.federated_g1 = True
  config.decentralized.g2 = True
  config.decentralized.local_synthesis = "harmonise"
  out = pipeline.run_stages(pipeline.Run(config, str(tmp_path), num_workers=1))
  # G1 is the federated global model: one metrics row per round, per client.
  rows = [json.loads(l) for l in (tmp_path / "g1" / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == config.fed.rounds and "CBICA/loss" in rows[-1] and "TCIA/loss" in rows[-1]
  assert out["export G1"]["G1 export step"] == config.fed.rounds * config.fed.local_steps
  # G2's export carries its card, saying no private slice was used.
  card = json.loads((tmp_path / "g2_model" / "model_card.json").read_text())
  assert card["private_data"]["used"] is False
  assert str(tmp_path) not in (tmp_path / "g2_model" / "model_card.json").read_text()
  # G2 saw public-origin healthy slices only; the shared set says it is shareable.
  assert card["data"]["healthy_origins"]["private"] == 0
  assert json.loads((tmp_path / "synthetic" / "manifest.json").read_text())["shareable"]
  # Center 2's local set is made by G2 in center 2's own healthy slices and
  # evaluated as run D_local (or listed); it is not shareable.
  assert out["local synthesis"]["local healthy split"] == "TCIA_healthy"
  local = json.loads((tmp_path / "local" / "synthetic" / "summary.json").read_text())
  assert local["synthetic_total"] == out["local synthesis"]["local pairs"] > 0
  assert local["shareable"] is False
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert "D_local" in results["runs"] or any(
      s["id"] == "D_local" for s in results["skipped"])
