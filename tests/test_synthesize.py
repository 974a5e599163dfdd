"""The synthesis stage (dfgm_jax/synthesis/stage.py) and its binary, on phantom slices.

One tiny model is trained and exported per module; a reference synthesis
(one process, one device, in process) is what the resumed and the
multi-process runs must reproduce. Library behaviour is tested through
stage.run; the binary keeps the tests of its flags, exit codes and the
multi-process run.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from data_pipeline import input_pipeline
from data_pipeline import slice_sets
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax.synthesis import pipeline
from dfgm_jax.synthesis import stage
from tests.conftest import ROOT, train_tiny

CENTERS = ("CBICA", "TCIA")


def _config(centers=CENTERS, **synthesis):
  from configs import tiny
  config = tiny.get_config()
  config.synthesis.centers = ",".join(centers)
  config.synthesis.backend = "pixels"
  config.sampler.steps = 5
  config.sampler.resamples = 1
  config.sampler.batch_size = 4
  for key, value in synthesis.items():
    setattr(config.synthesis, key, value)
  return config


def _run(workdir, model_dir, data_dir, config=None, **kwargs):
  return stage.run(config or _config(), str(workdir), slice_sets.SliceData(data_dir),
                   model_dir=model_dir, **kwargs)


def _env(devices=1):
  return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _cmd(workdir, model_dir, data_dir, *extra):
  return [sys.executable, "-m", "launch.synthesize", "--config=configs/tiny.py",
          f"--config.synthesis.centers={','.join(CENTERS)}",
          "--config.synthesis.backend=pixels", "--config.sampler.steps=5",
          "--config.sampler.resamples=1", "--config.sampler.batch_size=4",
          f"--workdir={workdir}", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
          *extra]


def _share_salt(reference, workdir, where="private/salt"):
  """The center's salt, so that pseudonymous keys compare across runs."""
  path = os.path.join(str(workdir), where)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write((reference / "private" / "salt").read_text())


def _images_by_key(workdir, center):
  examples = input_pipeline.read_examples(os.path.join(str(workdir), "synthetic"),
                                          f"{center}_synthetic", "grain")
  return {e["key"]: (e["image"], e["mask"], e["healthy"]) for e in examples}


def _assert_same_images(reference, workdir, centers=CENTERS):
  for center in centers:
    ref, got = _images_by_key(reference, center), _images_by_key(workdir, center)
    assert ref.keys() == got.keys()
    for key in ref:
      np.testing.assert_array_equal(got[key][0], ref[key][0])
      np.testing.assert_array_equal(got[key][1], ref[key][1])


@pytest.fixture(scope="module")
def trained(preprocessed_2020, tmp_path_factory):
  """(data_dir, manifest, training workdir, export dir, reference workdir, its result)."""
  data_dir, manifest = preprocessed_2020
  root = tmp_path_factory.mktemp("synth")
  g1 = str(root / "g1")
  config, _, _ = train_tiny(data_dir, g1, "CBICA", 10)
  export = str(root / "model")
  model_io.export_workdir(g1, config, export)
  reference = root / "reference"
  result = _run(reference, export, data_dir)
  return data_dir, manifest, g1, export, reference, result


def test_synthesize_writes_set_summary_and_figure(trained):
  data_dir, manifest, _, export, reference, result = trained
  out = reference / "synthetic"
  summary = json.loads((out / "summary.json").read_text())
  assert {k: result[k] for k in summary} == summary
  for center in CENTERS:
    n_tumor = manifest["splits"][f"{center}_train"]["num_slices"]
    assert summary["centers"][center]["tumor_slices"] == n_tumor
    assert 0 < summary["centers"][center]["synthetic"] <= 2 * n_tumor
    assert summary["centers"][center]["skipped_placement"] == 0
  assert summary["mode"] == "dfgm" and summary["backend"] == "pixels"
  assert summary["model_step"] == 10
  # G1's weights are private: their sha256 and folder name stay in the
  # private stage record, out of the shareable summary.
  assert "model_sha256" not in summary and "model" not in summary
  record = json.load(open(reference / "private" / "synthesis" / "record.json"))
  assert record["model"] == {"folder": "model", "sha256": json.load(
      open(os.path.join(export, "model.json")))["params_sha256"]}
  shared = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
  assert record["model"]["sha256"].encode() not in shared
  assert os.path.getsize(reference / "private" / "figures" / "comparison_CBICA.png") > 1000
  assert not (reference / "private" / "synthesis" / "staging").exists()
  examples = list(input_pipeline.read_examples(str(out), "TCIA_synthetic", "grain"))
  assert len(examples) == summary["centers"]["TCIA"]["synthetic"]
  tf_examples = list(input_pipeline.read_examples(str(out), "TCIA_synthetic", "tf"))
  assert sorted(e["key"] for e in tf_examples) == sorted(e["key"] for e in examples)
  for ex in examples:
    assert ex["image"].shape == (32, 32, 1) and ex["mask"].sum() > 0
    assert ex["mode"] == "dfgm" and int(ex["model_step"]) == 10
    for field in ("source", "healthy", "key"):
      assert "BraTS" not in ex[field]  # no raw patient identifier leaves.
    assert len(ex["source"]) == 16
  # A rerun reuses the finished output.
  again = _run(reference, export, data_dir)
  assert again["reused"] and again["synthetic_total"] == summary["synthetic_total"]


def _shared_files(workdir):
  shared = workdir / "synthetic"
  return {p: p.read_bytes() for p in shared.rglob("*") if p.is_file()}


def test_a_copied_workdir_reuses_its_set_and_names_its_own_folders(trained, tmp_path):
  data_dir, _, _, export, reference, result = trained
  copied = {name: str(tmp_path / name) for name in ("w", "slices", "model")}
  shutil.copytree(reference, copied["w"])
  shutil.copytree(data_dir, copied["slices"])
  shutil.copytree(export, copied["model"])
  again = _run(copied["w"], copied["model"], copied["slices"])
  assert again["reused"] and again["synthetic_total"] == result["synthetic_total"]
  assert again["paths"] == {k: v.replace(str(reference), copied["w"])
                            for k, v in result["paths"].items()}
  # The record names them relative to the workdir, which may move again.
  record = json.load(open(os.path.join(copied["w"], "private", "synthesis",
                                       "record.json")))
  assert not any(os.path.isabs(p) for p in record["paths"].values())


def test_shared_folder_does_not_reveal_the_patients(trained):
  data_dir, _, _, _, reference, _ = trained
  files = _shared_files(reference)
  assert any(p.suffix == ".json" for p in files) and len(files) > 4
  # Issue 11 item 5: the salt is private, and no candidate salt in the shared
  # folder turns a pseudonym back into a BraTS id.
  salt = (reference / "private" / "salt").read_text().strip()
  assert all(salt.encode() not in data for data in files.values())
  sources = {(e["source"], int(e["slice_index"])) for c in CENTERS
             for e in input_pipeline.read_examples(str(reference / "synthetic"),
                                                   f"{c}_synthetic", "grain")}
  # The attacker's best guess: every public BraTS id with the true slice indices.
  tumors = [slice_sets.load_split(data_dir, f"{c}_train") for c in CENTERS]
  ids = [f"BraTS20_Training_{i:03d}" for i in range(1, 370)]
  indices = sorted({int(z) for t in tumors for z in t["slice_index"]})

  def reversed_with(candidate):
    rows = pipeline.source_rows([i for i in ids for _ in indices], indices * len(ids),
                                candidate)
    return {k for k in rows if k in sources}

  assert reversed_with(salt)  # the attack works with the salt...
  candidates = {m.decode() for data in files.values()
                for m in re.findall(rb"[0-9a-f]{32}", data)} | {""}
  for candidate in candidates:
    assert not reversed_with(candidate)  # ...and nothing shared is it.
  # Item 6: no local path.
  for local in {str(reference), os.path.realpath(reference), data_dir,
                os.path.realpath(data_dir)}:
    for path, data in files.items():
      assert local.encode() not in data, path
  # Item 7: no figure of private slices in the shared folder.
  assert not [p for p in files if p.suffix in (".png", ".jpg", ".pdf")]


@pytest.mark.slow
@pytest.mark.ci_slow
def test_provenance_per_slice_drops_patient_grouping_and_slice_index(trained, tmp_path):
  from dfgm_jax import config_checks
  from dfgm_jax.privacy import scan
  assert config_checks.PROVENANCES == pipeline.PROVENANCES
  data_dir, manifest, _, export, reference, _ = trained
  salt = (reference / "private" / "salt").read_text().strip()
  # What would group a patient's slices: its pseudonym, in any form the scan reads.
  patients = [scan._token("case id", pipeline.salted_hash(c["case_id"], salt))
              for c in manifest["cases"]]

  def examples(workdir):
    return [e for c in CENTERS for e in input_pipeline.read_examples(
        str(workdir / "synthetic"), f"{c}_synthetic", "grain")]

  # The default (config.synthesis.provenance=slice): one pseudonym per source
  # slice, no slice index, the key without it; the salt maps each back.
  ex = examples(reference)
  assert {int(e["slice_index"]) for e in ex} == {pipeline.NO_SLICE_INDEX}
  assert all(e["key"].count("/") == 1 for e in ex)
  assert scan.scan({"set": str(reference / "synthetic")}, patients)["hits"] == []
  rows = {c: pipeline.source_rows(*(lambda t: (t["case_id"], t["slice_index"]))(
      slice_sets.load_split(data_dir, f"{c}_train")), salt) for c in CENTERS}
  assert all((e["source"], int(e["slice_index"])) in rows[e["center"]] for e in ex)
  # provenance=patient (research that needs patient-level splits) groups them.
  grouped = tmp_path / "grouped"
  _share_salt(reference, grouped)
  _run(grouped, export, data_dir, _config(provenance="patient"))
  assert scan.scan({"set": str(grouped / "synthetic")}, patients)["hits"]
  ex = examples(grouped)
  assert {e["source"] for e in ex} <= {t["value"] for t in patients}
  assert pipeline.NO_SLICE_INDEX not in {int(e["slice_index"]) for e in ex}
  summary = json.loads((grouped / "synthetic" / "summary.json").read_text())
  assert summary["provenance"] == "patient"
  # Both count the same patients in the manifest.
  splits = [json.loads((w / "synthetic" / "manifest.json").read_text())["splits"]
            for w in (reference, grouped)]
  assert splits[0] == splits[1]


def test_another_config_is_refused_saying_what_differs(trained, tmp_path):
  data_dir, _, _, export, reference, _ = trained
  before = (reference / "synthetic" / "manifest.json").read_bytes()
  with pytest.raises(errors.RunMismatch, match=r"synthesis\.k: 2 -> 1.*--overwrite"):
    _run(reference, export, data_dir, _config(k=1))
  assert (reference / "synthetic" / "manifest.json").read_bytes() == before
  # --overwrite replaces it (on a copy: the reference serves the other tests).
  copy = tmp_path / "copy"
  shutil.copytree(reference, copy)
  result = _run(copy, export, data_dir, _config(centers=("TCIA",), k=1), overwrite=True)
  assert result["k"] == 1 and set(result["centers"]) == {"TCIA"}
  assert json.loads((copy / "synthetic" / "manifest.json").read_text())["splits"].keys() == {
      "TCIA_synthetic"}


def test_unknown_center_fails_before_the_memory_bank(trained, tmp_path):
  data_dir, _, _, export, _, _ = trained
  with pytest.raises(errors.ConfigError, match=r"config\.synthesis\.centers=CBICA,NOPE.*"
                     r"\['NOPE'\].*its centers: \['CBICA'"):
    _run(tmp_path, export, data_dir, _config(centers=("CBICA", "NOPE")))
  assert not list(tmp_path.rglob("bank_*.npz"))
  with pytest.raises(errors.ConfigError, match="needs a model"):
    _run(tmp_path, None, data_dir)


def test_training_workdir_and_export_give_the_same_images(trained, tmp_path):
  data_dir, _, g1, _, reference, _ = trained
  # The salt where earlier versions kept it, in the shared folder: moved out,
  # the same pseudonyms.
  _share_salt(reference, tmp_path, "synthetic/.salt")
  _run(tmp_path, g1, data_dir, _config(centers=("TCIA",)))
  _assert_same_images(reference, tmp_path, ("TCIA",))
  assert not (tmp_path / "synthetic" / ".salt").exists()
  assert (tmp_path / "private" / "salt").read_text() == (
      reference / "private" / "salt").read_text()


def test_stopped_synthesis_resumes_at_the_next_batch(trained, tmp_path):
  data_dir, _, _, export, reference, _ = trained
  _share_salt(reference, tmp_path)
  r = _run(tmp_path, export, data_dir, stop_after_batches=2)
  assert r["stopped"]
  out = tmp_path / "synthetic"
  assert not (out / "manifest.json").exists()
  (run_dir,) = (tmp_path / "private" / "synthesis" / "staging").iterdir()
  staged = sorted(p.name for p in (run_dir / "CBICA").iterdir())
  assert staged == ["b000000.npz", "b000001.npz", "plan.npz"]
  # A write cut short by a kill leaves only a temporary name: never read.
  (run_dir / "CBICA" / "b000002.npz.tmp.npz").write_bytes(b"half a file")
  r = _run(tmp_path, export, data_dir)
  assert r["batches"]["CBICA"]["reused"] == 2 and not r["stopped"]
  _assert_same_images(reference, tmp_path)
  assert not (tmp_path / "private" / "synthesis" / "staging").exists()


@pytest.mark.slow
@pytest.mark.ci_slow
def test_two_processes_of_two_devices_match_one_device(trained, tmp_path):
  data_dir, _, _, export, reference, _ = trained
  _share_salt(reference, tmp_path)

  def run_two():
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        _cmd(tmp_path, export, data_dir, f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={pid}"),
        cwd=ROOT, env=_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for pid in range(2)]
    outs = []
    for p in procs:
      out, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
      outs.append(out)
    return outs

  outs = run_two()
  assert "synthesis done:" in outs[0] and "synthetic set:" in outs[0]
  summary = json.loads((tmp_path / "synthetic" / "summary.json").read_text())
  assert summary["devices"] == 4 and summary["processes"] == 2
  for center in CENTERS:
    ref, got = _images_by_key(reference, center), _images_by_key(tmp_path, center)
    assert ref.keys() == got.keys()
    for key in ref:
      np.testing.assert_allclose(got[key][0], ref[key][0], atol=1e-4)
      np.testing.assert_array_equal(got[key][1], ref[key][1])
      assert got[key][2] == ref[key][2]  # the same healthy match.
  # A rerun is reused by every process (none starts generating alone).
  assert "synthesis reused:" in run_two()[0]


def test_corrupt_export_is_refused_with_its_path(trained, tmp_path):
  data_dir, _, _, export, _, _ = trained
  bad = tmp_path / "model"
  bad.mkdir()
  for name in ("model.json", "params.npz"):
    data = open(os.path.join(export, name), "rb").read()
    (bad / name).write_bytes(data[:len(data) // 2] if name == "params.npz" else data)
  r = subprocess.run(_cmd(tmp_path, bad, data_dir), cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode != 0
  assert f"{bad}/params.npz" in r.stderr and "checksum" in r.stderr
