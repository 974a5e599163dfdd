"""Preprocessing end to end on phantom data (data_pipeline/preprocess.py)."""

import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline import brats
from data_pipeline import input_pipeline
from data_pipeline import phantom
from data_pipeline import preprocess
from dfgm_jax import errors

AR_ONLY = {"formats": ("array_record",)}  # TF-free and faster where tf.data is not tested.


def _splits_of(manifest):
  return {c["case_id"]: c["split"] for c in manifest["cases"]}


def test_manifest_splits_and_centers(preprocessed_2020, phantom_2020,
                                     tiny_data_cfg):
  out, manifest = preprocessed_2020
  centers = phantom_2020.center_of_case
  assert {c["case_id"]: c["center"] for c in manifest["cases"]} == centers
  assert manifest["skipped"] == []
  assert set(manifest["splits"]) == {"CBICA_train", "CBICA_test", "TCIA_train",
                                     "TCIA_test", "healthy", "CBICA_healthy",
                                     "TCIA_healthy", "CBICA_test_healthy",
                                     "TCIA_test_healthy"}
  split_of = _splits_of(manifest)
  for center in ("CBICA", "TCIA"):
    ids = [c for c, k in centers.items() if k == center]
    n_test = int(np.floor(0.2 * len(ids) + 0.5))
    assert sum(split_of[c] == "test" for c in ids) == n_test
    assert sum(split_of[c] == "train" for c in ids) == len(ids) - n_test
    for part in ("train", "test"):
      listed = {cid for cid, _ in manifest["slices"][f"{center}_{part}"]}
      assert listed <= {c for c in ids if split_of[c] == part}
      assert manifest["splits"][f"{center}_{part}"]["num_cases"] == len(listed)
  for cid in centers:
    if centers[cid] not in ("CBICA", "TCIA"):
      assert split_of[cid] == "public"
  healthy_cases = {cid for cid, _ in manifest["slices"]["healthy"]}
  # The shareable bank's split: public-center volumes only.
  assert healthy_cases and all(split_of[c] == "public" for c in healthy_cases)
  for name, split in manifest["splits"].items():
    assert split["num_slices"] == len(manifest["slices"][name])
  for file_format, rel in manifest["formats"].items():
    assert os.path.isdir(os.path.join(out, rel)), file_format
  # The default config's centers ('auto') keep the paper's two when present.
  from configs import default
  assert tiny_data_cfg["centers"] == default.get_config().data.centers == "auto"
  assert sorted(c for c, v in manifest["centers"].items() if v["private"]) == [
      "CBICA", "TCIA"]
  # Every required file was read in full (issue 11 item 11).
  assert manifest["validated"]["voxels_read"] == ["flair", "seg", "t1", "t1ce", "t2"]


def test_examples_hold_image_mask_labels_and_provenance(preprocessed_2020):
  out, manifest = preprocessed_2020
  centers = {c["case_id"]: c["center"] for c in manifest["cases"]}
  tumor = list(input_pipeline.read_examples(out, "CBICA_train", "grain"))
  healthy = list(input_pipeline.read_examples(out, "healthy", "grain"))
  assert len(tumor) == manifest["splits"]["CBICA_train"]["num_slices"]
  size = manifest["image_size"]
  for ex in tumor + healthy:
    assert ex["image"].shape == (size, size, 1) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    np.testing.assert_array_equal(ex["mask"], (ex["label"] > 0).astype(np.uint8))
    assert set(np.unique(ex["label"])) <= {0, 1, 2, 3}
    assert ex["center"] == centers[ex["case_id"]]
    assert ex["key"] == f"{ex['case_id']}/{ex['slice_index']:03d}"
    # 5 mm stride on 2.5 mm phantom slices: every second slice.
    assert ex["slice_index"] % 2 == 0
  assert all(ex["mask"].sum() > 0 for ex in tumor)
  assert all(ex["mask"].sum() == 0 for ex in healthy)
  # Each example carries its origin: a private patient's, or a public volume's.
  assert {ex["origin"] for ex in tumor} == {"private"}
  assert {ex["origin"] for ex in healthy} == {"public"}
  assert all(ex["brain"].sum() > 0.15 * size * size * 0.5 for ex in healthy)


def test_finished_output_is_reused_and_other_config_refused(preprocessed_2020,
                                                            phantom_2020,
                                                            tiny_data_cfg):
  out, manifest = preprocessed_2020
  stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
  calls = []
  again = preprocess.run(phantom_2020.data_dir, out, tiny_data_cfg,
                         progress=False, on_case_done=lambda *a: calls.append(a))
  assert again == manifest and calls == []
  assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp
  with pytest.raises(FileExistsError, match="--overwrite") as e:
    preprocess.run(phantom_2020.data_dir, out,
                   dict(tiny_data_cfg, image_size=16), progress=False)
  assert isinstance(e.value, errors.RunMismatch)
  assert "config.image_size: 32 -> 16" in str(e.value)  # says what differs.


def test_a_moved_or_copied_input_and_output_are_reused(preprocessed_2020, phantom_2020,
                                                        tiny_data_cfg, tmp_path):
  """The identity is the input's files and the config, not the folders' paths."""
  out, manifest = preprocessed_2020
  phantom_root = os.path.dirname(os.path.normpath(phantom_2020.data_dir))
  shutil.copytree(phantom_root, tmp_path / "phantom")  # times kept, as mv and cp -a.
  shutil.copytree(out, tmp_path / "slices")
  data_dir = os.path.join(tmp_path / "phantom",
                          os.path.relpath(phantom_2020.data_dir, phantom_root))
  calls = []
  again = preprocess.run(data_dir, str(tmp_path / "slices"), tiny_data_cfg,
                         progress=False, on_case_done=lambda *a: calls.append(a))
  assert again == manifest and calls == []
  # A manifest written when the identity held the input's path is reused too.
  legacy = json.loads((tmp_path / "slices" / "manifest.json").read_text())
  legacy["identity"]["brats_dir"] = phantom_2020.data_dir
  legacy["fingerprint"] = "0" * 16
  (tmp_path / "slices" / "manifest.json").write_text(json.dumps(legacy))
  assert preprocess.run(data_dir, str(tmp_path / "slices"), tiny_data_cfg,
                        progress=False)["fingerprint"] == "0" * 16


@pytest.mark.parametrize("field,value,says", [
    ("image_size", 0, "config.data.image_size=0: must be a positive integer"),
    ("image_size", 12.5, "config.data.image_size=12.5: must be a positive integer"),
    ("modalities", ("t2", "t3"), "unknown modality 't3'; allowed: ('t1', 't1ce', 't2', 'flair')"),
    ("modalities", (), "config.data.modalities=(): must be a non-empty"),
    ("spatial", "crop", "config.data.spatial='crop': must be one of ('resize', 'pad')"),
    ("on_error", "ignore", "config.data.on_error='ignore': must be one of"),
    ("formats", ("parquet",), "config.data.formats=('parquet',)"),
    ("test_fraction", 1.0, "config.data.test_fraction=1.0: must be a number in [0, 1)"),
    ("norm_percentiles", (99.5, 0.5), "config.data.norm_percentiles=(99.5, 0.5)"),
    ("healthy_max", -1, "config.data.healthy_max=-1: must be an integer >= 0"),
])
def test_bad_settings_are_refused_before_any_io(tmp_path, tiny_data_cfg, field,
                                                value, says):
  out = tmp_path / "out"
  with pytest.raises(errors.ConfigError) as e:
    preprocess.run(str(tmp_path / "no_such_folder"), str(out),
                   dict(tiny_data_cfg, **{field: value}), progress=False)
  assert says in str(e.value) and "\n" not in str(e.value)
  assert not out.exists()  # refused before any I/O.


def test_centers_not_in_the_data_are_named(phantom_2020, tiny_data_cfg, tmp_path):
  with pytest.raises(errors.ConfigError, match=r"config.data.centers='CBICA,MDA': "
                     r"centers \['MDA'\] not in the data; found \['2013', "
                     r"'BraTS2020', 'CBICA', 'TCIA', 'TMC'\]"):
    preprocess.run(phantom_2020.data_dir, str(tmp_path / "out"),
                   dict(tiny_data_cfg, centers="CBICA,MDA"), progress=False)


def _default_data_cfg(tiny_data_cfg):
  """configs/default.py's data section, scaled down as the tiny config does.

  Only the sizes are the tiny config's; `centers` (and every other field)
  stays the default's, so the default config is what meets each layout.
  """
  from configs import default
  cfg = default.get_config().data.to_dict()
  scaled = ("image_size", "min_tumor_area_mm2", "healthy_max")
  return dict(cfg, **{k: tiny_data_cfg[k] for k in scaled}, **AR_ONLY)


@pytest.mark.parametrize("version", ["2021", "2023"])
def test_other_versions(tmp_path, tiny_data_cfg, version):
  # Issue 11 item 10: the default config preprocesses 2021 and 2023 folders
  # (one center each) instead of asking for the paper's CBICA and TCIA.
  info = phantom.generate(str(tmp_path / "raw"), version=version, num_cases=4,
                          scale=0.4)
  cfg = _default_data_cfg(tiny_data_cfg)
  manifest = preprocess.run(info.data_dir, str(tmp_path / "out"), cfg,
                            progress=False)
  center = f"BraTS{version}"
  assert manifest["version"] == version
  # The phantom's marker in its data folder: the slices are phantom. The
  # same volumes without it (a real BraTS folder) read as real.
  assert manifest["source"] == {"kind": "phantom"}
  os.remove(os.path.join(info.data_dir, brats.PHANTOM_MARKER))
  cases = brats.discover_cases(info.data_dir)
  assert preprocess.data_source(info.data_dir, cases) == {"kind": "real"}
  assert set(manifest["splits"]) == {f"{center}_train", f"{center}_test", "healthy",
                                     f"{center}_healthy", f"{center}_test_healthy"}
  assert manifest["splits"][f"{center}_test"]["num_cases"] == 1
  # One private center and no public volume: no public background, said so;
  # its training patients' healthy slices are its own private split.
  assert manifest["splits"]["healthy"]["num_slices"] == 0
  assert manifest["healthy"]["public_volumes"] == 0
  assert manifest["splits"][f"{center}_healthy"]["origins"]["public"] == 0
  labels = set()
  for ex in input_pipeline.read_examples(str(tmp_path / "out"), f"{center}_train"):
    labels |= set(np.unique(ex["label"]).tolist())
  assert 3 in labels  # the enhancing tumor survives the label mapping.


def test_kaggle_layout_nii_and_quirk_355(tmp_path, tiny_data_cfg):
  info = phantom.generate(str(tmp_path / "raw"), version="2020", num_cases=3,
                          scale=0.4, compressed=False, kaggle_nesting=True,
                          quirk_355=True)
  manifest = preprocess.run(str(tmp_path / "raw"), str(tmp_path / "out"),
                            dict(tiny_data_cfg, centers="all", **AR_ONLY),
                            progress=False)
  assert "BraTS20_Training_355" in {c["case_id"] for c in manifest["cases"]}
  assert len(manifest["cases"]) == len(info.cases) == 3


def _copy(phantom_info, tmp_path):
  dst = tmp_path / "raw"
  shutil.copytree(phantom_info.data_dir, dst)
  return str(dst)


def test_bad_case_raises_or_is_skipped_and_listed(tmp_path, phantom_2020,
                                                  tiny_data_cfg):
  raw = _copy(phantom_2020, tmp_path)
  victim = phantom_2020.case_ids[2]
  path = os.path.join(raw, victim, f"{victim}_t2.nii.gz")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 3])
  cfg = dict(tiny_data_cfg, **AR_ONLY)
  with pytest.raises(brats.BratsDataError) as e:
    preprocess.run(raw, str(tmp_path / "out"), cfg, progress=False)
  assert e.value.path == path
  assert not os.path.exists(tmp_path / "out" / "manifest.json")
  manifest = preprocess.run(raw, str(tmp_path / "out"),
                            dict(cfg, on_error="skip"), progress=False)
  assert [s["path"] for s in manifest["skipped"]] == [path]
  assert manifest["skipped"][0]["reason"]
  assert victim not in {c["case_id"] for c in manifest["cases"]}
  assert len(manifest["cases"]) == len(phantom_2020.cases) - 1


class _Interrupt(Exception):
  pass


def test_interrupted_run_leaves_nothing_complete_and_resumes(
    tmp_path, phantom_2020, preprocessed_2020, tiny_data_cfg):
  raw = _copy(phantom_2020, tmp_path)
  out = str(tmp_path / "out")
  done = []

  def interrupt_after_three(case_id, result):
    done.append(case_id)
    if len(done) == 3:
      raise _Interrupt()

  with pytest.raises(_Interrupt):
    preprocess.run(raw, out, tiny_data_cfg, progress=False,
                   on_case_done=interrupt_after_three)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    next(input_pipeline.read_examples(out, "healthy"))

  reused = []
  manifest = preprocess.run(raw, out, tiny_data_cfg, progress=False,
                            on_case_done=lambda c, r: reused.append(r["reused"]))
  assert sum(reused) == 3 and len(reused) == len(phantom_2020.cases)
  ref_out, ref = preprocessed_2020
  assert manifest["slices"] == ref["slices"]
  assert manifest["splits"] == ref["splits"]
  assert not os.path.exists(os.path.join(out, preprocess.STAGING))
  for a, b in zip(input_pipeline.read_examples(out, "TCIA_train"),
                  input_pipeline.read_examples(ref_out, "TCIA_train")):
    assert a["key"] == b["key"]
    np.testing.assert_array_equal(a["image"], b["image"])


def test_parallel_workers_and_overwrite(tmp_path, phantom_2020, preprocessed_2020,
                                        tiny_data_cfg):
  out = str(tmp_path / "out")
  cfg = dict(tiny_data_cfg, **AR_ONLY)
  manifest = preprocess.run(phantom_2020.data_dir, out, cfg, num_workers=2,
                            progress=False)
  assert manifest["slices"] == preprocessed_2020[1]["slices"]
  calls = []
  preprocess.run(phantom_2020.data_dir, out, cfg, overwrite=True,
                 progress=False, on_case_done=lambda c, r: calls.append(r))
  assert len(calls) == len(phantom_2020.cases)
  assert not any(r["reused"] for r in calls)
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["slices"] == manifest["slices"]


def test_padding_to_a_larger_grid(tmp_path, phantom_2020, tiny_data_cfg):
  cfg = dict(tiny_data_cfg, image_size=128, spatial="pad", **AR_ONLY)
  out = str(tmp_path / "out")
  preprocess.run(phantom_2020.data_dir, out, cfg, progress=False)
  ex = next(input_pipeline.read_examples(out, "healthy"))
  assert ex["image"].shape == (128, 128, 1)
  # The 96 x 96 phantom slice sits in the middle; the border is background.
  assert np.all(ex["image"][:16] == -1.0) and np.all(ex["image"][-16:] == -1.0)
  assert np.all(ex["brain"][:16] == 0)


def test_healthy_cap_subsamples_public_cases(preprocessed_2020, phantom_2020,
                                            tiny_data_cfg, tmp_path):
  out = str(tmp_path / "out")
  manifest = preprocess.run(phantom_2020.data_dir, out,
                            dict(tiny_data_cfg, healthy_max=3, **AR_ONLY),
                            progress=False)
  split_of = _splits_of(manifest)
  chosen = manifest["slices"]["healthy"]
  assert len(chosen) == 3
  assert all(split_of[cid] == "public" for cid, _ in chosen)
