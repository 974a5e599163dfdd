"""G2 (dfgm_jax/train/g2.py, launch/public_data.py): the guard, training, the card.

G2 trains a few steps of the tiny network on a stand-in synthetic set
written through the data layer (the CBICA tumor slices mirrored; the
synthesis stage has its own tests) and the phantom's healthy split.
The helpers here are also test_local_synthesis.py's.
"""

import json
import os

import numpy as np
import pytest

from data_pipeline import builder
from data_pipeline import slice_sets
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax import provenance
from dfgm_jax.train import diffusion
from dfgm_jax.train import g2
from launch import public_data

G2_STEPS = 4


def stand_in_synthetic_set(data_dir, out_dir, center="CBICA"):
  """A <center>_synthetic split through the data layer, no diffusion model."""
  src = slice_sets.load_split(data_dir, f"{center}_train")
  n = len(src["image"])
  res = {"image": src["image"][:, :, ::-1], "mask": src["mask"][:, :, ::-1].astype(np.uint8),
         "source": [f"pseudonym{i:02d}" for i in range(n)], "center": [center] * n,
         "slice_index": list(src["slice_index"]), "healthy": [f"h{i}" for i in range(n)],
         "rank": [0] * n}
  formats = slice_sets.SliceData(data_dir).write_synthetic_set(
      out_dir, {center: res}, image_size=res["image"].shape[1],
      channels=res["image"].shape[-1], mode="dfgm", model_step=1,
      formats=("array_record",))
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    # As the synthesis stage writes it; formats: <format>/<name>/<version>.
    json.dump({"dataset": formats["array_record"].split("/")[1], "formats": formats,
               "image_size": res["image"].shape[1], "channels": res["image"].shape[-1],
               "splits": {f"{center}_synthetic": {"num_slices": n, "num_cases": n}},
               "shareable": True, "healthy_origins": {"public": n, "private": 0}}, f)
  return out_dir


def healthy_only_set(data_dir, out_dir):
  """An institute's preprocessing output holding only a `healthy` split."""
  src = slice_sets.load_split(data_dir, "healthy")
  manifest = slice_sets.load_manifest(data_dir)
  n = len(src["image"])

  def examples():
    for i in range(n):
      yield src["key"][i], {k: (src[k][i].astype(np.uint8) if k in ("mask", "brain")
                                else src[k][i]) for k in src}

  size, channels = src["image"].shape[1], src["image"].shape[-1]
  formats = slice_sets.write_set(out_dir, builder.DATASET_NAME,
                                 builder.features(size, channels), {"healthy": examples},
                                 ("array_record",))
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump({"fingerprint": "institute0000000", "image_size": size, "channels": channels,
               "modalities": manifest["modalities"], "formats": formats,
               "splits": {"healthy": manifest["splits"]["healthy"]}}, f)
  return out_dir


def tiny_g2_config(num_steps=G2_STEPS):
  from configs import tiny
  config = tiny.get_config()
  config.train.reader = "grain"
  config.train.num_steps = num_steps
  config.train.checkpoint_every = num_steps
  config.train.log_every = 2
  config.synthesis.backend = "pixels"
  config.sampler.steps = 5
  config.sampler.resamples = 1
  config.sampler.batch_size = 4
  return config


def train_g2(data_dir, root, privacy=None):
  """(config, result, synthetic dir, export dir) of a G2 trained in `root`."""
  synthetic = stand_in_synthetic_set(data_dir, os.path.join(root, "synthetic"))
  config = tiny_g2_config()
  result = public_data.train_and_export(
      config, os.path.join(root, "g2"), os.path.join(root, "g2_model"), data_dir,
      [synthetic], privacy_json=privacy, progress=False)
  return config, result, synthetic, os.path.join(root, "g2_model")


def finished_audit(folder, summary, *, kind="synthetic set", split="CBICA_synthetic",
                   set_fingerprint=None, g2_params=None):
  """A privacy audit's privacy.json and done-record as privacy/audit.py writes
  them (its own tests run the audit); returns privacy.json's path."""
  os.makedirs(folder, exist_ok=True)
  privacy = os.path.join(folder, "privacy.json")
  with open(privacy, "w") as f:
    json.dump({"summary": summary}, f)
  with open(os.path.join(folder, g2.AUDIT_RECORD), "w") as f:
    json.dump({"identity": {"g2": g2_params, "candidate_split": split},
               "candidates": {"kind": kind, "split": split,
                              "set_fingerprint": set_fingerprint},
               "summary_sha256": g2.summary_sha256(summary)}, f)
  return privacy


SUMMARY = {"nearest_real_distance_min": 0.31, "memorised": 0, "report": "/x/report.md"}


@pytest.fixture(scope="module")
def trained(preprocessed_2020, tmp_path_factory):
  data_dir, manifest = preprocessed_2020
  root = str(tmp_path_factory.mktemp("g2"))
  config, result, synthetic, export = train_g2(data_dir, root)
  # The audit of G2's own synthetic set, finished after G2 was exported (as
  # in the pipeline): only the card is rewritten.
  params = model_io.read_record(export)["params_sha256"]
  privacy = finished_audit(os.path.join(root, "privacy"), SUMMARY, g2_params=params,
                           set_fingerprint=g2.set_fingerprint(
                               synthetic, slice_sets.load_manifest(synthetic)))
  g2.export(config, os.path.join(root, "g2"), export, privacy_json=privacy)
  assert model_io.read_record(export)["params_sha256"] == params
  return data_dir, manifest, root, config, result, synthetic, export


# --- The guard ---------------------------------------------------------------------


def _real_manifest():
  return {"fingerprint": "f" * 16, "formats": {"array_record": "array_record/brats_slices/1.0.0"},
          "splits": {"healthy": {"num_slices": 3, "origins": {"public": 3, "private": 0}},
                     "CBICA_train": {"num_slices": 2}, "CBICA_test": {"num_slices": 1}}}


def _synthetic_manifest(*splits, **fields):
  return {"dataset": g2.SYNTHETIC_DATASET, "shareable": True,
          "splits": {s: {"num_slices": 2} for s in splits or ("CBICA_synthetic",)},
          **fields}


def test_synthetic_dataset_name_is_the_data_layers():
  assert g2.SYNTHETIC_DATASET == builder.SYNTHETIC_NAME
  assert g2.dataset_name(_real_manifest()) == builder.DATASET_NAME


def test_guard_passes_public_splits_only():
  tumor = g2.PublicInput("tumor", "/s", _synthetic_manifest(), "CBICA_synthetic")
  healthy = g2.PublicInput("healthy", "/d", _real_manifest(), "healthy")
  g2.check_public([tumor, healthy])  # public: no error.
  cases = [
      (g2.PublicInput("tumor", "/d", _real_manifest(), "CBICA_train"), "'CBICA_train'"),
      (g2.PublicInput("tumor", "/d", _real_manifest(), "CBICA_test"), "'CBICA_test'"),
      (g2.PublicInput("healthy", "/d", _real_manifest(), "CBICA_train"), "'CBICA_train'"),
      (g2.PublicInput("healthy", "/s", _synthetic_manifest(), "CBICA_synthetic"),
       "'CBICA_synthetic'"),
      # A synthetic set holding a private split (a doctored manifest).
      (g2.PublicInput("tumor", "/s", _synthetic_manifest("CBICA_train"), "CBICA_train"),
       "'CBICA_train'"),
  ]
  for bad, named in cases:
    with pytest.raises(g2.PrivateDataError, match=named) as e:
      g2.check_public([tumor, healthy, bad])
    assert bad.where in str(e.value)
  with pytest.raises(errors.ConfigError, match="at least one synthetic set"):
    g2.check_public([healthy])


def test_guard_judges_by_provenance_not_by_split_name():
  tumor = g2.PublicInput("tumor", "/s", _synthetic_manifest(), "CBICA_synthetic")
  healthy = g2.PublicInput("healthy", "/d", _real_manifest(), "healthy")
  local_reason = provenance.bank_verdict(
      {"splits": {"healthy": {"origins": {"public": 0, "private": 5}}}}, local=True).reason
  research = _real_manifest()
  research["splits"]["healthy"]["origins"] = {"public": 1, "private": 2}
  unrecorded = _real_manifest()
  del unrecorded["splits"]["healthy"]["origins"]
  cases = [
      # W/local's set: a <center>_synthetic split, but the institute's backgrounds.
      (g2.PublicInput("tumor", "/w/local/synthetic", _synthetic_manifest(
          shareable=False, not_shareable_because=local_reason), "CBICA_synthetic"),
       "not shareable"),
      # A set made on private-patient backgrounds (data.healthy_include_private).
      (g2.PublicInput("tumor", "/w/private/synthetic", _synthetic_manifest(
          shareable=False, not_shareable_because="its backgrounds come from private "
          "patients"), "CBICA_synthetic"), "private patients"),
      # A set that states nothing (made before origins were recorded).
      (g2.PublicInput("tumor", "/old/synthetic", {"dataset": g2.SYNTHETIC_DATASET,
                                                  "splits": {"CBICA_synthetic": {}}},
                      "CBICA_synthetic"), "does not state"),
      # A `healthy` split holding private patients' slices, or unrecorded origins.
      (g2.PublicInput("healthy", "/r", research, "healthy"), "2 private-patient"),
      (g2.PublicInput("healthy", "/u", unrecorded, "healthy"), "origin not recorded"),
      # A private center's own healthy split.
      (g2.PublicInput("healthy", "/d", _real_manifest(), "CBICA_healthy"),
       "'CBICA_healthy' of /d .* is a private split"),
      # Its test patients' tumor-free slices (the evaluation's false positives),
      # as healthy or as tumor examples.
      (g2.PublicInput("healthy", "/d", _real_manifest(), "CBICA_test_healthy"),
       "'CBICA_test_healthy' of /d .* is a private split"),
      (g2.PublicInput("tumor", "/d", _real_manifest(), "CBICA_test_healthy"),
       "'CBICA_test_healthy' of /d .* is a private split"),
  ]
  for bad, why in cases:
    others = [i for i in (tumor, healthy) if i.role != bad.role]
    with pytest.raises(g2.PrivateDataError, match=why) as e:
      g2.check_public([*others, bad])
    assert bad.where in str(e.value)
  # The same split names pass when the recorded provenance is public.
  g2.check_public([tumor, healthy])


def test_guard_refuses_a_preprocessing_output_as_synthetic_set(preprocessed_2020, tmp_path):
  data_dir, _ = preprocessed_2020
  # Every split of a given set is an input: the real slices' are private.
  with pytest.raises(g2.PrivateDataError,
                     match=r"split 'CBICA_(test|train|healthy)' .* is a private split") as e:
    public_data.load(tiny_g2_config(), data_dir, [data_dir])
  assert data_dir in str(e.value)
  # A synthetic set whose manifest names a private split is refused too.
  doctored = tmp_path / "doctored"
  doctored.mkdir()
  (doctored / "manifest.json").write_text(json.dumps(
      _synthetic_manifest("CBICA_synthetic", "TCIA_train")))
  with pytest.raises(g2.PrivateDataError, match="'TCIA_train'"):
    public_data.load(tiny_g2_config(), data_dir, [str(doctored)])


def test_g2_never_resumes_another_run():
  config = tiny_g2_config()
  # G1, or a model trained like G2 on the dilated region from private data:
  # neither run identity equals G2's, so the workdir claim refuses them.
  dilated = config.copy_and_resolve_references()
  dilated.mask.region = dilated.train.loss_region = "dilated"
  ids = [diffusion.run_identity(json.loads(c.to_json_best_effort()))
         for c in (config, dilated, g2.g2_config(config, "a" * 16),
                   g2.g2_config(config, "b" * 16))]
  assert len({json.dumps(i, sort_keys=True) for i in ids}) == 4
  assert g2.g2_config(config, "a" * 16).mask.region == "dilated"
  assert g2.g2_config(config, "a" * 16).train.loss_region == "dilated"


def test_g2_overrides_and_their_refusal():
  import ml_collections
  config = tiny_g2_config()
  config.g2 = ml_collections.ConfigDict({"num_steps": 7, "p_healthy": 0.25})
  out = g2.g2_config(config, "x")
  assert (out.train.num_steps, out.train.p_healthy) == (7, 0.25)
  config.g2.no_such_field = 1
  with pytest.raises(errors.ConfigError, match="config.g2.no_such_field"):
    g2.g2_config(config, "x")


# --- Training, export and card -------------------------------------------------------


def test_g2_trains_on_public_data_and_exports(trained):
  data_dir, manifest, root, config, result, synthetic, export = trained
  assert result["step"] == G2_STEPS and not result["preempted"]
  assert np.isfinite(result["metrics"]["loss"])
  record = model_io.read_record(export)
  assert record["step"] == G2_STEPS
  assert record["config"]["mask"]["region"] == "dilated"
  assert record["config"]["train"]["loss_region"] == "dilated"
  assert result["tumor slices"] == manifest["splits"]["CBICA_train"]["num_slices"]
  assert result["healthy slices"] == manifest["splits"]["healthy"]["num_slices"]


def test_card_says_what_g2_saw(trained):
  data_dir, manifest, root, config, result, synthetic, export = trained
  card = model_io.read_card(export)
  record = model_io.read_record(export)
  assert card["format"] == g2.CARD_FORMAT and card["model"] == "G2"
  assert card["weights"]["params_sha256"] == record["params_sha256"]
  assert card["weights"]["step"] == G2_STEPS
  (tumor,) = card["data"]["tumor_examples"]
  (healthy,) = card["data"]["healthy_examples"]
  n_tumor = manifest["splits"]["CBICA_train"]["num_slices"]
  assert (tumor["split"], tumor["num_slices"]) == ("CBICA_synthetic", n_tumor)
  assert (healthy["split"], healthy["num_slices"]) == (
      "healthy", manifest["splits"]["healthy"]["num_slices"])
  # The preprocessing fingerprint (paths, case ids, file times) is private.
  assert "set_fingerprint" not in healthy
  assert healthy["content_sha256"] == g2.content_sha256(
      slice_sets.load_split(data_dir, "healthy"))
  # The healthy slices by origin, as the preprocessing recorded them: public only.
  n_healthy = manifest["splits"]["healthy"]["num_slices"]
  assert healthy["origins"] == {"public": n_healthy, "private": 0}
  assert card["data"]["healthy_origins"] == {"public": n_healthy, "private": 0}
  assert f"{n_healthy} healthy slices of public-center volumes (0 of private" in (
      card["private_data"]["statement"])
  # The synthetic set has no fingerprint: a hash of its manifest and shards.
  assert tumor["set_fingerprint"] == g2.set_fingerprint(
      synthetic, slice_sets.load_manifest(synthetic))
  assert tumor["content_sha256"] == g2.content_sha256(
      slice_sets.load_split(synthetic, "CBICA_synthetic"))
  assert card["private_data"]["used"] is False
  assert card["private_data"]["guard"] == "dfgm_jax.train.g2.check_public"
  assert card["private_data"]["inputs_checked"] == 2
  assert card["training"]["loss_region"] == "dilated"
  assert card["training"]["num_steps"] == G2_STEPS
  assert card["regions"] == {"conditioning": "dilated", "loss": "dilated",
                             "r_out_240": config.mask.r_out_240}
  assert card["sampler"]["steps"] == config.sampler.steps
  # The audit's summary, without the entry that is a path.
  assert card["privacy_audit"] == {"nearest_real_distance_min": 0.31, "memorised": 0}
  md = open(os.path.join(export, model_io.MODEL_CARD_MD)).read()
  assert "CBICA_synthetic" in md and "Used: **no**" in md and "0.31" in md


def test_card_holds_no_path_case_id_or_salt(trained):
  data_dir, manifest, root, *_, export = trained
  texts = [open(os.path.join(export, name)).read()
           for name in (model_io.MODEL_CARD, model_io.MODEL_CARD_MD, model_io.MODEL_JSON)]
  case_ids = [c["case_id"] for c in manifest["cases"]]
  pseudonyms = slice_sets.load_split(os.path.join(root, "synthetic"),
                                     "CBICA_synthetic")["source"]
  for text in texts:
    assert root not in text and data_dir not in text and "/tmp" not in text
    assert manifest["fingerprint"] not in text
    assert not any(c in text for c in case_ids)
    assert not any(p in text for p in pseudonyms)
    assert "salt" not in text.lower()


def test_card_takes_only_a_finished_audit_of_its_own_synthetic_set(trained, tmp_path):
  _, _, root, _, _, synthetic, export = trained
  record = g2.read_inputs(os.path.join(root, "g2"))
  params = model_io.read_record(export)["params_sha256"]
  mine = g2.set_fingerprint(synthetic, slice_sets.load_manifest(synthetic))

  def card_audit(name, **kw):
    path = finished_audit(str(tmp_path / name), SUMMARY, **{
        "set_fingerprint": mine, "g2_params": params, **kw})
    return path, g2.audit_for_card(path, record, params)

  _, (summary, note) = card_audit("own")
  assert summary == {k: v for k, v in SUMMARY.items() if k != "report"}
  assert "'CBICA_synthetic' G2 was trained on" in note
  # The training split audited (the README's sanity check) is never the card's.
  _, (summary, note) = card_audit("train", kind="real split", split="CBICA_train")
  assert summary is None and "real split 'CBICA_train'" in note
  _, (summary, note) = card_audit("other set", set_fingerprint="0" * 16)
  assert summary is None and "not of a synthetic set G2 was trained on" in note
  _, (summary, note) = card_audit("old weights", g2_params="f" * 64)
  assert summary is None and "other G2 weights" in note
  path, _ = card_audit("killed")
  os.remove(os.path.join(os.path.dirname(path), g2.AUDIT_RECORD))
  summary, note = g2.audit_for_card(path, record, params)
  assert summary is None and "not finished" in note
  path, _ = card_audit("altered")
  with open(path, "w") as f:
    json.dump({"summary": {**SUMMARY, "memorised": 5}}, f)
  assert g2.audit_for_card(path, record, params)[0] is None
  # Through export: an export that holds its own audit keeps it, untouched...
  train_audit, _ = card_audit("train2", kind="real split", split="CBICA_train")
  before = open(os.path.join(export, model_io.MODEL_CARD), "rb").read()
  g2.export(tiny_g2_config(), os.path.join(root, "g2"), export, privacy_json=train_audit)
  assert open(os.path.join(export, model_io.MODEL_CARD), "rb").read() == before
  # ...and a new export gets none, and says why.
  fresh = str(tmp_path / "fresh")
  g2.export(tiny_g2_config(), os.path.join(root, "g2"), fresh, privacy_json=train_audit)
  card = model_io.read_card(fresh)
  assert card["privacy_audit"] is None and "real split" in card["privacy_audit_note"]
  md = open(os.path.join(fresh, model_io.MODEL_CARD_MD)).read()
  assert "None on this card: the privacy audit given is of real split" in md


@pytest.mark.slow
@pytest.mark.ci_slow
def test_a_same_config_rerun_keeps_the_export_and_its_audit(trained):
  data_dir, _, root, config, *_, export = trained
  before = {f: open(os.path.join(export, f), "rb").read() for f in os.listdir(export)}
  assert model_io.read_card(export)["privacy_audit"] is not None
  # launch.train_g2's rerun without --privacy_json: training is finished, and
  # the export (weights, card, its audit) is kept as it is.
  result = public_data.train_and_export(
      config, os.path.join(root, "g2"), export, data_dir,
      [os.path.join(root, "synthetic")], progress=False)
  assert result["step"] == G2_STEPS
  assert {f: open(os.path.join(export, f), "rb").read()
          for f in os.listdir(export)} == before


def test_altered_card_is_refused(trained, tmp_path):
  *_, export = trained
  import shutil
  copy = str(tmp_path / "model")
  shutil.copytree(export, copy)
  path = os.path.join(copy, model_io.MODEL_CARD)
  card = json.load(open(path))
  card["private_data"]["used"] = True
  with open(path, "w") as f:
    json.dump(card, f)
  with pytest.raises(model_io.ModelError, match="checksum mismatch"):
    model_io.read_card(copy)


def test_export_refuses_a_folder_it_did_not_write(trained, tmp_path):
  _, _, root, config, *_ = trained
  other = tmp_path / "not_a_model"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(errors.RunMismatch, match="not an export of this G2"):
    g2.export(config, os.path.join(root, "g2"), str(other))
  assert (other / "keep.txt").read_text() == "mine"
  # G1's workdir (no g2_inputs.json) is not G2's: nothing to export with a card.
  with pytest.raises(model_io.ModelError, match="not a G2 training run"):
    g2.export(config, str(tmp_path), str(tmp_path / "out"))
