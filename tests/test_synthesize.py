"""The synthesis binary end to end on phantom slices (launch/synthesize.py)."""

import json
import os
import subprocess
import sys

from data_pipeline import input_pipeline
from tests.conftest import ROOT, train_tiny


def test_synthesize_writes_set_summary_and_figure(preprocessed_2020, tmp_path):
  data_dir, manifest = preprocessed_2020
  model_dir = str(tmp_path / "g1")
  train_tiny(data_dir, model_dir, "TCIA", 10)

  cmd = [sys.executable, "-m", "launch.synthesize", "--config=configs/tiny.py",
         "--config.train.center=TCIA", "--config.synthesis.backend=pixels",
         "--config.sampler.steps=5", "--config.sampler.resamples=1",
         "--config.sampler.batch_size=8", f"--workdir={tmp_path}",
         f"--model_dir={model_dir}", f"--data_dir={data_dir}"]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = tmp_path / "synthetic"
  summary = json.loads((out / "summary.json").read_text())
  n_tumor = manifest["splits"]["TCIA_train"]["num_slices"]
  assert summary["centers"]["TCIA"]["tumor_slices"] == n_tumor
  assert 0 < summary["synthetic_total"] <= 2 * n_tumor
  assert summary["mode"] == "dfgm" and summary["backend"] == "pixels"
  assert summary["model_step"] == 10
  assert os.path.getsize(out / "comparison.png") > 1000
  examples = list(input_pipeline.read_examples(str(out), "TCIA_synthetic", "grain"))
  assert len(examples) == summary["synthetic_total"]
  tf_examples = list(input_pipeline.read_examples(str(out), "TCIA_synthetic", "tf"))
  assert sorted(e["key"] for e in tf_examples) == sorted(e["key"] for e in examples)
  for ex in examples:
    assert ex["image"].shape == (32, 32, 1) and ex["mask"].sum() > 0
    assert ex["mode"] == "dfgm" and int(ex["model_step"]) == 10
    for field in ("source", "healthy", "key"):
      assert "BraTS" not in ex[field]  # no raw patient identifier leaves.
    assert len(ex["source"]) == 16
  # A rerun reuses the finished output.
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0 and "reused" in again.stdout


def test_killed_synthesis_resumes_from_staged_centers(preprocessed_2020, tmp_path):
  import signal
  import time
  data_dir, _ = preprocessed_2020
  model_dir = str(tmp_path / "g1")
  train_tiny(data_dir, model_dir, "CBICA", 2)
  cmd = [sys.executable, "-m", "launch.synthesize", "--config=configs/tiny.py",
         "--config.synthesis.centers=CBICA,TCIA", "--config.synthesis.backend=pixels",
         "--config.sampler.steps=30", "--config.sampler.resamples=1",
         "--config.sampler.batch_size=4", f"--workdir={tmp_path}",
         f"--model_dir={model_dir}", f"--data_dir={data_dir}"]
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  staging = tmp_path / "synthetic" / ".staging"
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  start = time.time()
  while not (staging.exists() and any(p.name.startswith("CBICA.") and p.suffix == ".npz"
                                      and ".tmp" not in p.name for p in staging.iterdir())):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() - start < 600
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "synthetic" / "manifest.json").exists()
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "CBICA: reusing staged" in r.stderr
  summary = json.loads((tmp_path / "synthetic" / "summary.json").read_text())
  assert set(summary["centers"]) == {"CBICA", "TCIA"}
  assert all(v["synthetic"] > 0 for v in summary["centers"].values())
  assert not staging.exists()
  cbica = list(input_pipeline.read_examples(str(tmp_path / "synthetic"), "CBICA_synthetic"))
  assert len(cbica) == summary["centers"]["CBICA"]["synthetic"]
