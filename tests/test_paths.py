"""Bucket URLs (gs://...) for training's data and workdir; clear refusals elsewhere."""

import json
import os
import subprocess
import sys

from etils.epath import gpath
from etils.epath import testing as epath_testing
import pytest

from data_pipeline import input_pipeline
from dfgm_jax import paths
from dfgm_jax.train import metrics
from tests.conftest import ROOT


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """gs://bucket/... served from tmp_path/store/bucket/... through epath's backend.

  epath hands gs:// to tf.io.gfile whenever TensorFlow is installed; the mock
  replaces the scheme backends, so that choice is turned off here.
  """
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def local(p):
    p = os.fspath(p)
    return p.replace("gs://", str(tmp_path / "store") + "/") if p.startswith("gs://") else p

  def through(fn, p, *args, **kwargs):
    return fn(local(p), *args, **kwargs)

  with epath_testing.mock_epath(open=through, exists=through, isdir=through,
                                makedirs=through, mkdir=through, listdir=through,
                                glob=lambda fn, p: fn(local(p))):
    yield tmp_path / "store"


def test_urls_stay_urls_and_local_paths_become_absolute():
  assert paths.absolute("gs://b/run/checkpoints") == "gs://b/run/checkpoints"
  assert paths.absolute("runs/x") == os.path.join(os.getcwd(), "runs/x")
  assert paths.is_url("s3://b/x") and not paths.is_url("/data/gs:/x")


def test_metrics_go_to_a_bucket_workdir(fake_bucket, tmp_path):
  writer = metrics.MetricsWriter("gs://bucket/runs/g1")
  writer.write(5, {"loss": 0.25})
  writer.close()
  lines = (fake_bucket / "bucket/runs/g1/metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1]) == {"step": 5, "loss": 0.25}
  events = list((fake_bucket / "bucket/runs/g1/tensorboard").iterdir())
  assert len(events) == 1 and events[0].name.startswith("events.out.tfevents.")
  # What os calls would have done: a local folder named 'gs:'.
  assert not (tmp_path / "gs:").exists()


def test_the_readers_find_a_bucket_data_dir(fake_bucket):
  manifest = {"splits": {"healthy": {"num_slices": 7}}}
  (fake_bucket / "bucket/slices").mkdir(parents=True)
  (fake_bucket / "bucket/slices/manifest.json").write_text(json.dumps(manifest))
  assert input_pipeline.split_size("gs://bucket/slices", "healthy") == 7
  with pytest.raises(FileNotFoundError, match="gs://bucket/other: no manifest.json"):
    input_pipeline.load_manifest("gs://bucket/other")
  # The data set's folder is looked up through the bucket too.
  with pytest.raises(FileNotFoundError, match="no tfrecord copy"):
    input_pipeline._tfds_builder("gs://bucket/slices", "tf")  # pylint: disable=protected-access


def test_an_export_in_a_bucket_is_read_and_checked(fake_bucket):
  import numpy as np
  from configs import tiny
  from dfgm_jax import model_io
  from dfgm_jax.diffusion import denoiser
  from dfgm_jax.train import diffusion
  config = tiny.get_config()
  _, _, state = diffusion.init_state(config)
  model_io.export(state["ema"], config, 3, str(fake_bucket / "bucket/model"))
  assert model_io.is_export("gs://bucket/model")
  record, arrays = model_io.read_export("gs://bucket/model")
  want = model_io.flatten(state["ema"])
  assert record["step"] == 3 and arrays.keys() == want.keys()
  assert all(np.array_equal(arrays[k], want[k]) for k in want)
  model = denoiser.Denoiser.load("gs://bucket/model", config)  # what synthesis reads.
  assert model.step == 3 and model.model_id == record["params_sha256"]
  # The checksum is verified through the bucket too.
  params = fake_bucket / "bucket/model/params.npz"
  params.write_bytes(params.read_bytes()[:-100])
  with pytest.raises(model_io.ModelError, match="gs://bucket/model/params.npz: checksum"):
    model_io.read_export("gs://bucket/model")
  with pytest.raises(model_io.ModelError, match="gs://bucket/none: neither"):
    denoiser.Denoiser.load("gs://bucket/none", config)


@pytest.mark.parametrize("args,flag", [
    (["launch.export_model", "--model_dir=gs://b/g1", "--out=gs://b/model"], "--out=gs://b/model"),
    (["launch.synthesize", "--model_dir=runs/model", "--data_dir=gs://b/slices",
      "--workdir=gs://b/syn"], "--workdir=gs://b/syn"),
])
def test_binaries_with_local_file_calls_refuse_urls(args, flag, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  r = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert flag in r.stderr and "local or mounted path" in r.stderr
  assert not (tmp_path / "gs:").exists()  # nothing written
