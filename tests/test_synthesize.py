"""The synthesis and export binaries end to end on phantom slices.

One tiny model is trained and exported per module; a reference synthesis
(one process, one device) is what the resumed and the multi-process runs
must reproduce.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import input_pipeline
from tests.conftest import ROOT, train_tiny

CENTERS = ("CBICA", "TCIA")


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


def _run(cmd, devices=1):
  r = subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _share_salt(reference, workdir):
  """The center's salt, so that pseudonymous keys compare across runs."""
  os.makedirs(os.path.join(str(workdir), "synthetic"), exist_ok=True)
  with open(os.path.join(str(workdir), "synthetic", ".salt"), "w") as f:
    f.write((reference / "synthetic" / ".salt").read_text())


def _images_by_key(workdir, center):
  examples = input_pipeline.read_examples(os.path.join(str(workdir), "synthetic"),
                                          f"{center}_synthetic", "grain")
  return {e["key"]: (e["image"], e["mask"], e["healthy"]) for e in examples}


@pytest.fixture(scope="module")
def trained(preprocessed_2020, tmp_path_factory):
  """(data_dir, manifest, training workdir, export dir, reference workdir)."""
  data_dir, manifest = preprocessed_2020
  root = tmp_path_factory.mktemp("synth")
  g1 = str(root / "g1")
  train_tiny(data_dir, g1, "CBICA", 10)
  export = str(root / "model")
  r = subprocess.run([sys.executable, "-m", "launch.export_model", f"--model_dir={g1}",
                      f"--out={export}"], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  reference = root / "reference"
  _run(_cmd(reference, export, data_dir))
  return data_dir, manifest, g1, export, reference


def test_synthesize_writes_set_summary_and_figure(trained):
  data_dir, manifest, _, export, reference = trained
  out = reference / "synthetic"
  summary = json.loads((out / "summary.json").read_text())
  for center in CENTERS:
    n_tumor = manifest["splits"][f"{center}_train"]["num_slices"]
    assert summary["centers"][center]["tumor_slices"] == n_tumor
    assert 0 < summary["centers"][center]["synthetic"] <= 2 * n_tumor
  assert summary["mode"] == "dfgm" and summary["backend"] == "pixels"
  assert summary["model_step"] == 10
  assert summary["model_sha256"] == json.load(open(os.path.join(export, "model.json")))[
      "params_sha256"]
  assert os.path.getsize(out / "comparison.png") > 1000
  assert not (out / ".staging").exists()
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
  again = _run(_cmd(reference, export, data_dir))
  assert "reused" in again.stdout


def test_training_workdir_and_export_give_the_same_images(trained, tmp_path):
  data_dir, _, g1, _, reference = trained
  _share_salt(reference, tmp_path)
  _run(_cmd(tmp_path, g1, data_dir, "--config.synthesis.centers=TCIA"))
  ref, got = _images_by_key(reference, "TCIA"), _images_by_key(tmp_path, "TCIA")
  assert ref.keys() == got.keys()
  for key in ref:
    np.testing.assert_array_equal(got[key][0], ref[key][0])


def test_stopped_synthesis_resumes_at_the_next_batch(trained, tmp_path):
  data_dir, _, _, export, reference = trained
  _share_salt(reference, tmp_path)
  r = _run(_cmd(tmp_path, export, data_dir, "--stop_after_batches=2"))
  assert "stopped" in r.stdout
  out = tmp_path / "synthetic"
  assert not (out / "manifest.json").exists()
  (run_dir,) = (out / ".staging").iterdir()
  staged = sorted(p.name for p in (run_dir / "CBICA").iterdir())
  assert staged == ["b000000.npz", "b000001.npz", "plan.npz"]
  # A write cut short by a kill leaves only a temporary name: never read.
  (run_dir / "CBICA" / "b000002.npz.tmp.npz").write_bytes(b"half a file")
  r = _run(_cmd(tmp_path, export, data_dir))
  assert "2 staged before" in r.stderr
  for center in CENTERS:
    ref, got = _images_by_key(reference, center), _images_by_key(tmp_path, center)
    assert ref.keys() == got.keys()
    for key in ref:
      np.testing.assert_array_equal(got[key][0], ref[key][0])
      np.testing.assert_array_equal(got[key][1], ref[key][1])
  assert not (out / ".staging").exists()


def test_two_processes_of_two_devices_match_one_device(trained, tmp_path):
  portpicker = pytest.importorskip("portpicker")
  data_dir, _, _, export, reference = trained
  port = portpicker.pick_unused_port()
  _share_salt(reference, tmp_path)
  procs = [subprocess.Popen(
      _cmd(tmp_path, export, data_dir, f"--coordinator_address=localhost:{port}",
           "--num_processes=2", f"--process_id={pid}"),
      cwd=ROOT, env=_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for pid in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  summary = json.loads((tmp_path / "synthetic" / "summary.json").read_text())
  assert summary["devices"] == 4 and summary["processes"] == 2
  for center in CENTERS:
    ref, got = _images_by_key(reference, center), _images_by_key(tmp_path, center)
    assert ref.keys() == got.keys()
    for key in ref:
      np.testing.assert_allclose(got[key][0], ref[key][0], atol=1e-4)
      np.testing.assert_array_equal(got[key][1], ref[key][1])
      assert got[key][2] == ref[key][2]  # the same healthy match.


def test_corrupt_export_is_refused_with_its_path(trained, tmp_path):
  data_dir, _, _, export, _ = trained
  bad = tmp_path / "model"
  bad.mkdir()
  for name in ("model.json", "params.npz"):
    data = open(os.path.join(export, name), "rb").read()
    (bad / name).write_bytes(data[:len(data) // 2] if name == "params.npz" else data)
  r = subprocess.run(_cmd(tmp_path, bad, data_dir), cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode != 0
  assert f"{bad}/params.npz" in r.stderr and "checksum" in r.stderr
