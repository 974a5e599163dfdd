"""Local synthesis from G2's export alone (dfgm_jax/synthesis/local.py, launch.synthesize_local).

The institute's folder holds only G2's export, its own healthy set (a
preprocessing output with a `healthy` split only) and a copy of the public
synthetic set. G2 here is an export of fresh weights with a real card
(the G2 path's training and card are test_g2.py's; synthesis only needs an
export): the properties tested (counts, what is kept bit for bit, which
mask the network is given) do not depend on trained weights. The binaries
end to end, with a trained G2, are the slow test.
"""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import input_pipeline
from data_pipeline import slice_sets
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax.diffusion import denoiser
from dfgm_jax.synthesis import local
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import pipeline
from dfgm_jax.train import g2
from launch import public_data
from tests import test_g2
from tests.conftest import ROOT

K = 2


def _config():
  config = test_g2.tiny_g2_config()
  config.synthesis.k = K
  # Every match valid, so the set holds k pairs per tumor slice.
  config.synthesis.min_inside_brain = 0.0
  config.synthesis.figure_rows = 0  # the stage's own tests cover the figure.
  config.data.formats = ("array_record",)  # one copy of each set: half the writing.
  return config


def _g2_export(config, healthy_dir, synthetic_dir, out):
  """An export of fresh G2 weights with the card G2's export carries."""
  inputs = [g2.PublicInput("tumor", synthetic_dir, slice_sets.load_manifest(synthetic_dir),
                           "CBICA_synthetic"),
            g2.PublicInput("healthy", healthy_dir, slice_sets.load_manifest(healthy_dir),
                           "healthy")]
  g2.check_public(inputs)
  described = [g2.describe(i, g2.set_fingerprint(i.where, i.manifest),
                           g2.content_sha256(slice_sets.load_split(i.where, i.split)))
               for i in inputs]
  cfg = g2.g2_config(config, g2.inputs_id(described))
  record = {"public_data": cfg.train.public_data, "inputs": described, "guard": g2.GUARD,
            "inputs_checked": len(inputs)}
  model = denoiser.Denoiser.init(cfg)
  return model_io.export(model.params, cfg, 0, out, loss_region="dilated",
                         card=g2.model_card(cfg, record, None),
                         card_markdown=g2.card_markdown)


@pytest.fixture(scope="module")
def institute(preprocessed_2020, tmp_path_factory):
  """A folder with only G2's export, the institute's healthy set, the public set."""
  data_dir, _ = preprocessed_2020
  public = str(tmp_path_factory.mktemp("public"))
  synthetic = test_g2.stand_in_synthetic_set(data_dir, os.path.join(public, "synthetic"))
  export = _g2_export(_config(), data_dir, synthetic, os.path.join(public, "g2_model"))
  root = tmp_path_factory.mktemp("institute")
  shutil.copytree(export, root / "g2_model")
  shutil.copytree(synthetic, root / "public_synthetic")
  test_g2.healthy_only_set(data_dir, str(root / "own_slices"))
  shutil.rmtree(public)  # nothing but the institute's folder is left.
  return root


def _run(institute, mode, workdir, k=None):
  return local.run(_config(), str(workdir),
                   slice_sets.SliceData(str(institute / "own_slices")),
                   slice_sets.SliceData(str(institute / "public_synthetic")),
                   model_dir=str(institute / "g2_model"), mode=mode, k=k)


@pytest.fixture(scope="module")
def harmonised(institute):
  return _run(institute, "harmonise", institute / "w_harmonise")


@pytest.fixture(scope="module")
def generated(institute):
  # k=1 (the pipeline's decentralized.local_k): one image per public tumor.
  return _run(institute, "generate", institute / "w_generate", k=1)


def _pairs(institute, workdir):
  """Each synthetic example with its public tumor slice and own healthy slice."""
  salt = (workdir / "private" / "salt").read_text().strip()
  tumors = slice_sets.load_split(str(institute / "public_synthetic"), "CBICA_synthetic")
  healthy = slice_sets.load_split(str(institute / "own_slices"), "healthy")
  # A public example's pseudonym and match rank stand for its case id.
  rows = pipeline.source_rows([f"{s}/{r}" for s, r in zip(tumors["source"], tumors["rank"])],
                              tumors["slice_index"], salt)
  tumor_of = {key: tumors["image"][i] for key, i in rows.items()}
  healthy_of = {pipeline.salted_hash(k, salt): h for k, h in zip(healthy["key"],
                                                                healthy["image"])}
  out = []
  for e in input_pipeline.read_examples(str(workdir / "synthetic"), "CBICA_synthetic",
                                        "grain"):
    out.append((e["image"], e["mask"].astype(np.float32),
                tumor_of[(e["source"], e["slice_index"])], healthy_of[e["healthy"]]))
  return tumors, out


def _dilated(mask, r_out):
  return np.asarray(masks.dilate(jnp.asarray(mask[None]), r_out))[0]


def _check_counts(institute, workdir, result, mode, k=K):
  tumors, pairs = _pairs(institute, workdir)
  n = k * len(tumors["image"])
  assert result["synthetic_total"] == len(pairs) == n
  manifest = slice_sets.load_manifest(str(workdir / "synthetic"))
  cases = set(zip(tumors["source"], tumors["rank"]))
  assert manifest["splits"] == {"CBICA_synthetic": {"num_slices": n, "num_cases": len(cases)}}
  assert result["mode"] == local.MODES[mode]
  return pairs


def test_harmonise_keeps_the_tumor_and_the_background_exactly(institute, harmonised):
  workdir = institute / "w_harmonise"
  pairs = _check_counts(institute, workdir, harmonised, "harmonise")
  r_out = masks.radius_for_size(_config().mask.r_out_240, _config().data.image_size)
  changed = 0
  for image, mask, tumor, healthy in pairs:
    inside = np.broadcast_to(mask > 0, image.shape)
    outside = np.broadcast_to(_dilated(mask, r_out) == 0, image.shape)
    np.testing.assert_array_equal(image[inside], tumor[inside])  # the pasted tumor.
    np.testing.assert_array_equal(image[outside], healthy[outside])  # the background.
    ring = ~inside & ~outside
    changed += int(np.any(image[ring] != healthy[ring]))
  assert changed == len(pairs)  # the ring was generated in every image.


def test_generate_keeps_the_background_and_makes_the_tumor(institute, generated):
  workdir = institute / "w_generate"
  pairs = _check_counts(institute, workdir, generated, "generate", k=1)
  r_out = masks.radius_for_size(_config().mask.r_out_240, _config().data.image_size)
  for image, mask, tumor, healthy in pairs:
    outside = np.broadcast_to(_dilated(mask, r_out) == 0, image.shape)
    inside = np.broadcast_to(mask > 0, image.shape)
    np.testing.assert_array_equal(image[outside], healthy[outside])
    assert np.any(image[inside] != tumor[inside])  # generated, not pasted.


def test_rerun_reuses_and_the_folder_holds_only_the_institutes(institute, harmonised):
  again = _run(institute, "harmonise", institute / "w_harmonise")
  assert again["reused"]
  # The institute's folder: G2's export, its own healthy slices, the public
  # set, and the workdirs of its runs (the fixture deleted everything else).
  names = {p.name for p in institute.iterdir()}
  assert {"g2_model", "own_slices", "public_synthetic", "w_harmonise"} <= names
  assert names <= {"g2_model", "own_slices", "public_synthetic", "w_harmonise",
                   "w_generate"}


def test_harmonise_gives_g2_the_dilated_region_it_was_trained_on(institute):
  model = local.load_shared_model(str(institute / "g2_model"), _config())
  model.check_mode("dfgm")  # harmonise: allowed for G2 ...
  model.check_mode("anomalydiffusion")  # ... and generate.
  plain = denoiser.Denoiser.load(str(institute / "g2_model"), _config())
  with pytest.raises(errors.ConfigError, match="mode=dfgm"):
    plain.check_mode("dfgm")  # why SharedModel exists.
  seen = []
  model.eps_fn = lambda params: (lambda x, t, c, cond, tumor: seen.append(cond) or x)
  tumor = np.zeros((1, 32, 32, 1), np.float32)
  tumor[0, 12:18, 10:16] = 1
  x = jnp.zeros((1, 32, 32, 4))
  model.dilated_eps_fn(None)(x, jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32),
                             masks.ring(jnp.asarray(tumor), model.r_out), jnp.asarray(tumor))
  np.testing.assert_array_equal(np.asarray(seen[0]),
                                np.asarray(masks.dilate(jnp.asarray(tumor), model.r_out)))


def test_a_model_without_g2_card_is_refused(institute, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(institute / "g2_model", bare)
  os.remove(bare / model_io.MODEL_CARD)
  with pytest.raises(model_io.ModelError, match="model_card.json: missing"):
    local.load_shared_model(str(bare), _config())
  # An export without a card at all (e.g. G1's).
  cfg = g2.g2_config(_config(), "x")
  params = denoiser.Denoiser.load(str(institute / "g2_model"), cfg).params
  g1_like = model_io.export(params, cfg, 0, str(tmp_path / "g1_like"), loss_region="dilated")
  with pytest.raises(model_io.ModelError, match="no G2 model card"):
    _run_with_model(institute, g1_like, tmp_path / "w")


def _run_with_model(institute, model_dir, workdir):
  return local.run(_config(), str(workdir), slice_sets.SliceData(str(institute / "own_slices")),
                   slice_sets.SliceData(str(institute / "public_synthetic")),
                   model_dir=model_dir, mode="harmonise")


def test_unknown_center_and_mode_are_refused(institute, tmp_path):
  with pytest.raises(errors.ConfigError, match="TCIA"):
    local.run(_config(), str(tmp_path), slice_sets.SliceData(str(institute / "own_slices")),
              slice_sets.SliceData(str(institute / "public_synthetic")),
              model_dir=str(institute / "g2_model"), centers=["TCIA"])
  with pytest.raises(errors.ConfigError, match="--mode=paint"):
    local.synthesis_mode("paint")


def test_private_slices_as_the_tumor_set_are_refused_as_no_synthetic_set(tmp_path):
  # Two manifests only: the refusal comes before any slice or model is read.
  def slice_set(name, splits):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(
        {"image_size": 32, "splits": {s: {"num_slices": 3} for s in splits}}))
    return slice_sets.SliceData(str(folder))

  own = slice_set("own_slices", ["healthy"])
  private = slice_set("private_slices", ["CBICA_train", "CBICA_test", "healthy"])
  with pytest.raises(errors.UserError) as e:
    local.run(_config(), str(tmp_path / "w2"), own, private,
              model_dir=str(tmp_path / "g2_model"))
  assert str(e.value).startswith(
      f"{private.data_dir}: holds no public synthetic set (no <center>_synthetic "
      "split; its splits: ['CBICA_test', 'CBICA_train', 'healthy'])")
  assert "train.center" not in str(e.value)
  assert not (tmp_path / "w2").exists()


@pytest.mark.slow
def test_binaries_train_g2_then_synthesize_locally(preprocessed_2020, tmp_path):
  """launch.train_g2 then launch.synthesize_local, each its own process."""
  data_dir, _ = preprocessed_2020
  synthetic = test_g2.stand_in_synthetic_set(data_dir, str(tmp_path / "synthetic"))
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  common = ["--config=configs/tiny.py", "--config.train.reader=grain"]
  train = subprocess.run(
      [sys.executable, "-m", "launch.train_g2", *common, "--config.train.num_steps=2",
       "--config.train.checkpoint_every=2", "--config.train.log_every=1",
       f"--workdir={tmp_path / 'g2'}", f"--synthetic_dir={synthetic}",
       f"--healthy_dir={data_dir}", f"--out={tmp_path / 'g2_model'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "G2 training done at step 2" in train.stdout
  card = model_io.read_card(str(tmp_path / "g2_model"))
  assert card["private_data"]["used"] is False
  # Its private split as a synthetic set: refused, naming the split.
  refused = subprocess.run(
      [sys.executable, "-m", "launch.train_g2", *common, f"--workdir={tmp_path / 'g2b'}",
       f"--synthetic_dir={data_dir}", f"--healthy_dir={data_dir}",
       f"--out={tmp_path / 'g2b_model'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert refused.returncode == 1 and "CBICA_t" in refused.stderr
  own = test_g2.healthy_only_set(data_dir, str(tmp_path / "own"))
  synth = subprocess.run(
      [sys.executable, "-m", "launch.synthesize_local", *common,
       "--config.synthesis.backend=pixels", "--config.sampler.steps=5",
       "--config.sampler.resamples=1", "--config.sampler.batch_size=4",
       "--config.synthesis.min_inside_brain=0", f"--model_dir={tmp_path / 'g2_model'}",
       f"--healthy_dir={own}", f"--tumors_dir={synthetic}", f"--workdir={tmp_path / 'w2'}",
       "--mode=generate"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert synth.returncode == 0, synth.stderr[-3000:]
  assert "local synthesis (generate) done" in synth.stdout
  n = slice_sets.load_manifest(synthetic)["splits"]["CBICA_synthetic"]["num_slices"]
  manifest = slice_sets.load_manifest(str(tmp_path / "w2" / "synthetic"))
  assert manifest["splits"]["CBICA_synthetic"]["num_slices"] == 2 * n


def test_the_local_set_is_not_shareable_and_g2_refuses_it(institute, harmonised):
  # The institute's own healthy slices are its backgrounds: by provenance,
  # whatever its split is called, G2's guard refuses it before reading it.
  out = institute / "w_harmonise" / "synthetic"
  manifest = slice_sets.load_manifest(str(out))
  assert manifest["shareable"] is False
  assert "local synthesis" in manifest["not_shareable_because"]
  assert json.loads((out / "summary.json").read_text())["shareable"] is False
  with pytest.raises(g2.PrivateDataError, match="not shareable") as e:
    public_data.public_inputs(str(institute / "own_slices"), [str(out)])
  assert str(out) in str(e.value)
