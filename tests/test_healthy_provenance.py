"""Every healthy slice knows where it came from (dfgm_jax/provenance.py).

Preprocessing's `healthy` split (the memory bank, G2's healthy data, DP's
unclipped pool) holds public-origin slices only unless the research switch
data.healthy_include_private lets private patients' slices in; what it holds
is recorded per slice and per split, and read by the stages that must judge
by it.
"""

import logging

import pytest

from data_pipeline import preprocess
from dfgm_jax import errors
from dfgm_jax import provenance

PUBLIC_CENTER = "2013"


def _metas_and_zs(public_healthy=(2, 1), private_healthy=(6, 6, 6, 6)):
  """Two public volumes and four CBICA patients, with their healthy slice counts."""
  metas, zs = {}, {}
  for i, n in enumerate(public_healthy):
    metas[f"pub{i}"] = {"center": PUBLIC_CENTER}
    zs[f"pub{i}"] = {"tumor": [], "healthy": list(range(0, 5 * n, 5))}
  for i, n in enumerate(private_healthy):
    metas[f"cbica{i}"] = {"center": "CBICA"}
    zs[f"cbica{i}"] = {"tumor": [40, 45], "healthy": list(range(0, 5 * n, 5))}
  return metas, zs


def _cfg(**overrides):
  return {"test_fraction": 0.25, "split_seed": 0, "healthy_seed": 0,
          "healthy_max": 10, "healthy_include_private": False, **overrides}


def test_healthy_split_is_public_origin_only_by_default():
  metas, zs = _metas_and_zs()
  plan, case_split = preprocess.plan_splits(metas, zs, ["CBICA"], _cfg())
  # 3 public slices exist for healthy_max=10: the split holds those 3, never
  # filled up from the private patients (the old behaviour took 7 of theirs).
  assert sorted(e[0] for e in plan["healthy"]) == ["pub0", "pub0", "pub1"]
  assert {case_split[e[0]] for e in plan["healthy"]} == {"public"}
  # The private training patients' healthy slices are CBICA's own, private split.
  own = plan["CBICA_healthy"]
  assert own and {case_split[e[0]] for e in own} == {"train"}
  test_patients = {c for c, s in case_split.items() if s == "test"}
  assert test_patients and not test_patients & {e[0] for e in own}


def test_test_patients_healthy_slices_form_the_private_test_healthy_split():
  metas, zs = _metas_and_zs()
  plan, case_split = preprocess.plan_splits(metas, zs, ["CBICA"], _cfg())
  test_patients = sorted(c for c, s in case_split.items() if s == "test")
  # Every healthy slice the per-volume selection kept of each test patient
  # (healthy_max caps banks, not the evaluation's set), by case then z.
  assert plan["CBICA_test_healthy"] == [
      (c, "CBICA", "healthy", i) for c in test_patients
      for i in range(len(zs[c]["healthy"]))]
  # Test patients only, and never in a bank: `healthy` nor CBICA_healthy.
  held = {e[0] for e in plan["CBICA_test_healthy"]}
  assert held == set(test_patients)
  for bank in ("healthy", "CBICA_healthy"):
    assert not held & {e[0] for e in plan[bank]}
  with_private = preprocess.plan_splits(metas, zs, ["CBICA"],
                                        _cfg(healthy_include_private=True))[0]
  assert not held & {e[0] for e in with_private["healthy"]}
  # Private by origin; public centers get no such split.
  assert {preprocess.origin_of(case_split[c]) for c in held} == {provenance.PRIVATE}
  assert f"{PUBLIC_CENTER}_test_healthy" not in plan


def test_too_few_public_slices_are_reported(caplog):
  metas, zs = _metas_and_zs()
  cfg = _cfg()
  plan, case_split = preprocess.plan_splits(metas, zs, ["CBICA"], cfg)
  with caplog.at_level(logging.WARNING):
    report = preprocess.healthy_report(plan, case_split, zs, cfg)
  assert report == {"asked": 10, "num_slices": 3, "public": 3, "private": 0,
                    "public_available": 3, "public_volumes": 2, "include_private": False}
  assert "only 3 public-origin slices (from 2 public volumes) for healthy_max=10" in (
      caplog.text)


def test_the_research_switch_fills_from_private_patients_and_says_so(caplog):
  metas, zs = _metas_and_zs()
  cfg = _cfg(healthy_include_private=True)
  plan, case_split = preprocess.plan_splits(metas, zs, ["CBICA"], cfg)
  origins = [preprocess.origin_of(case_split[e[0]]) for e in plan["healthy"]]
  assert len(origins) == 10 and origins.count("public") == 3
  with caplog.at_level(logging.WARNING):
    report = preprocess.healthy_report(plan, case_split, zs, cfg)
  assert (report["public"], report["private"]) == (3, 7)
  assert "7 of 10 slices are private patients'" in caplog.text
  # The public selection does not depend on the switch.
  default, _ = preprocess.plan_splits(metas, zs, ["CBICA"], _cfg())
  assert [e for e in plan["healthy"] if e[0].startswith("pub")] == default["healthy"]


def test_manifest_records_every_slice_origin(preprocessed_2020):
  _, manifest = preprocessed_2020
  split_of = {c["case_id"]: c["split"] for c in manifest["cases"]}
  for name, entries in manifest["slices"].items():
    origins = manifest["slice_origins"][name]
    assert len(origins) == len(entries)
    for (case_id, _), origin in zip(entries, origins):
      assert origin == ("public" if split_of[case_id] == "public" else "private")
    counts = manifest["splits"][name]["origins"]
    assert counts == {"public": origins.count("public"),
                      "private": origins.count("private")}
  healthy = manifest["splits"]["healthy"]
  assert healthy["num_slices"] and healthy["origins"]["private"] == 0
  assert provenance.is_public(manifest, "healthy")
  for center in ("CBICA", "TCIA"):
    own = f"{center}_healthy"
    assert manifest["splits"][own]["origins"]["public"] == 0
    assert {split_of[c] for c, _ in manifest["slices"][own]} <= {"train"}
  report = manifest["healthy"]
  assert report["public"] == healthy["num_slices"] and report["private"] == 0
  assert report["include_private"] is False


def test_bank_verdict():
  def manifest(public, private):
    return {"splits": {"healthy": {"num_slices": public + private,
                                   "origins": {"public": public, "private": private}}}}

  assert provenance.bank_verdict(manifest(5, 0)).shareable
  research = provenance.bank_verdict(manifest(5, 2))
  assert not research.shareable and research.private_bank
  assert "2 private-patient slices" in research.reason
  assert provenance.RESEARCH_SWITCH in research.reason
  unrecorded = provenance.bank_verdict({"splits": {"healthy": {"num_slices": 3}}})
  assert not unrecorded.shareable and "preprocess again" in unrecorded.reason
  local = provenance.bank_verdict(manifest(5, 0), local=True)
  assert not local.shareable and not local.private_bank and "local" in local.reason
  assert not provenance.bank_verdict(manifest(5, 0), baseline=True).shareable
  assert provenance.set_shareable({"shareable": True}) == (True, "")
  assert not provenance.set_shareable({})[0]


def test_dp_refuses_a_healthy_pool_with_private_patients(tmp_path):
  import json
  from configs import tiny
  from launch import train_data
  config = tiny.get_config()
  for origins, refused in (({"public": 4, "private": 0}, False),
                           ({"public": 4, "private": 3}, True), (None, True)):
    split = {"num_slices": 4}
    if origins:
      split["origins"] = origins
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"healthy": split}}))
    if not refused:
      train_data.check_dp_public_pool(config, str(tmp_path))
      continue
    with pytest.raises(errors.ConfigError, match="unclipped") as e:
      train_data.check_dp_public_pool(config, str(tmp_path))
    assert str(tmp_path) in str(e.value) and "config.dp.enabled=True" in str(e.value)


@pytest.fixture(scope="module")
def research_workdir(phantom_2020, tiny_data_cfg, tmp_path_factory):
  """W made with the research switch: private patients' slices in the bank."""
  import os
  from configs import tiny
  from data_pipeline import slice_sets
  from dfgm_jax.synthesis import stage
  w = str(tmp_path_factory.mktemp("research") / "W")
  cfg = dict(tiny_data_cfg, healthy_include_private=True, formats=("array_record",))
  manifest = preprocess.run(phantom_2020.data_dir, os.path.join(w, "slices"), cfg,
                            progress=False)
  config = tiny.get_config()
  config.data.healthy_include_private = True
  config.data.formats = ("array_record",)
  config.train.center = "TCIA"
  config.synthesis.backend = "pixels"
  config.synthesis.mode = "cutpaste"
  # A shareable set of an earlier run in W/synthetic is not this run's.
  os.makedirs(os.path.join(w, "synthetic"))
  result = stage.run(config, w, slice_sets.SliceData(os.path.join(w, "slices")))
  return w, config, manifest, result


@pytest.mark.slow
@pytest.mark.ci_slow
def test_the_research_switch_makes_a_set_that_is_not_shareable(research_workdir):
  import json
  import os
  from data_pipeline import slice_sets
  from dfgm_jax.synthesis import stage
  from dfgm_jax.train import g2
  from launch import pipeline
  from launch import public_data
  w, config, manifest, result = research_workdir
  assert manifest["healthy"]["private"] > 0  # the tiny phantom has few public slices.
  out = os.path.join(w, "private", "synthetic")
  assert result["paths"]["synthetic set"] == out == stage.synthetic_dir(w)
  assert not os.path.exists(os.path.join(w, "synthetic"))
  set_manifest = slice_sets.load_manifest(out)
  summary = json.load(open(os.path.join(out, "summary.json")))
  for said in (set_manifest, summary, result):
    assert said["shareable"] is False
    assert provenance.RESEARCH_SWITCH in said["not_shareable_because"]
    assert said["healthy_origins"] == manifest["splits"]["healthy"]["origins"]
  # G2 refuses the set and the healthy split, naming each; the pipeline skips G2.
  with pytest.raises(g2.PrivateDataError, match="not shareable") as e:
    public_data.public_inputs(os.path.join(w, "slices"), [out])
  assert out in str(e.value)
  synthetic_ok = {"dataset": g2.SYNTHETIC_DATASET, "shareable": True,
                  "splits": {"TCIA_synthetic": {"num_slices": 1}}}
  with pytest.raises(g2.PrivateDataError, match="private-patient slices"):
    g2.check_public([g2.PublicInput("tumor", "/s", synthetic_ok, "TCIA_synthetic"),
                     g2.PublicInput("healthy", w, manifest, "healthy")])
  with config.unlocked():
    from configs import federated
    config.decentralized = federated.get_decentralized_config()
    config.decentralized.g2 = True
  run = pipeline.Run(config, w, outputs={"synthesize": {"synthetic set": out}})
  assert pipeline.train_g2(run)["G2"].startswith("skipped: the synthetic set is not shareable")
  assert not os.path.exists(os.path.join(w, "g2"))


@pytest.mark.slow
@pytest.mark.ci_slow
def test_the_audit_reports_private_backgrounds_as_a_leak(research_workdir):
  from data_pipeline import slice_sets
  from dfgm_jax.privacy import audit
  w, config, manifest, _ = research_workdir
  inputs = audit.workdir_inputs(config, w, slice_sets.SliceData)
  cands = slice_sets.load_split(inputs.candidates.data_dir, "TCIA_synthetic")
  res = audit.background_check(cands, inputs.real.manifest, inputs.salt)
  assert res["private"] > 0 and res["unknown"] == 0
  assert res["fraction_not_public"] == res["private"] / res["n_backgrounds"]
  assert audit.background_verdict(res)[0] == "leak"


def test_an_empty_healthy_split_is_refused_with_what_to_change(tmp_path):
  # All-private data (e.g. BraTS 2021/2023 read as one center) has no public
  # healthy slice: training and synthesis refuse it instead of reading
  # private patients' slices, and say what to change.
  import json
  import types
  from configs import tiny
  from dfgm_jax.synthesis import stage
  from launch import train_data
  manifest = {"splits": {"healthy": {"num_slices": 0,
                                     "origins": {"public": 0, "private": 0}}}}
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  config = tiny.get_config()
  config.train.reader = "grain"
  with pytest.raises(errors.ConfigError, match="'healthy' split is empty") as e:
    train_data.load_healthy(config, str(tmp_path), shard=False)
  assert provenance.RESEARCH_SWITCH in str(e.value) and str(tmp_path) in str(e.value)
  data = types.SimpleNamespace(manifest=manifest, data_dir=str(tmp_path))
  with pytest.raises(errors.ConfigError, match="holds no slice") as e:
    stage.bank_verdict(data)
  assert provenance.RESEARCH_SWITCH in str(e.value)
