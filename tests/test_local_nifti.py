"""Local synthesis from a folder of NIfTI volumes (data_pipeline/healthy_volumes.py,
launch.synthesize_local --healthy_nifti).

The phantom's BraTS folder is the institute's volumes in the case-folder
layout; its T2 files, with and without their segmentation, the flat layout.
The reference for every pixel is the regular preprocessing of the same
volumes (the session's preprocessed_2020), and for the slice choice a plain
numpy count of the volume's brain voxels.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_pipeline import brats
from data_pipeline import healthy_volumes
from data_pipeline import input_pipeline
from data_pipeline import slice_sets
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax.synthesis import pipeline
from launch import healthy_nifti
from tests.conftest import REAL_FIXTURE, REAL_ID, ROOT, write_nifti


@pytest.fixture
def cfg(tiny_data_cfg):
  # One format (half the writing); every slice kept (no healthy_max subsample).
  return {**tiny_data_cfg, "formats": ("array_record",), "healthy_max": 10_000}


def _split(out):
  d = slice_sets.load_split(str(out), "healthy")
  return {k: (d["image"][i], d["brain"][i], d["label"][i]) for i, k in enumerate(d["key"])}


def _stem(case_id, modality):
  return brats.file_stem("2020", case_id, modality)


def _flat(phantom, tmp_path, with_seg, without_seg):
  """A flat folder: <id>_t2.nii.gz of each case, <id>_seg.nii.gz of some."""
  flat = tmp_path / "flat"
  flat.mkdir()
  for case_id in with_seg + without_seg:
    folder = os.path.join(phantom.data_dir, case_id)
    shutil.copy(os.path.join(folder, _stem(case_id, "t2") + ".nii.gz"), flat)
    if case_id in with_seg:
      shutil.copy(os.path.join(folder, _stem(case_id, "seg") + ".nii.gz"), flat)
  return flat


def test_case_folders_give_the_slices_and_pixels_of_preprocessing(
    phantom_2020, preprocessed_2020, cfg, tmp_path):
  data_dir, regular = preprocessed_2020
  out = tmp_path / "healthy_slices"
  manifest = healthy_volumes.run(phantom_2020.data_dir, str(out), cfg)
  assert list(manifest["splits"]) == ["healthy"]
  mine = _split(out)
  # Each volume's healthy slices: as many as preprocessing chose in it ...
  per_case = {c["case_id"]: c["num_healthy_slices"] for c in regular["cases"]}
  assert len(mine) == sum(per_case.values()) == manifest["splits"]["healthy"]["num_slices"]
  assert {k.split("/")[0] for k in mine} == {c for c, n in per_case.items() if n}
  # ... and those in the regular healthy split (test patients excluded,
  # subsampled) are the same slices, pixel for pixel.
  theirs = _split(data_dir)
  assert theirs and set(theirs) <= set(mine)
  for key, (image, brain, label) in theirs.items():
    np.testing.assert_array_equal(mine[key][0], image)
    np.testing.assert_array_equal(mine[key][1], brain)
    np.testing.assert_array_equal(mine[key][2], label)
  assert not any(np.any(label) for _, _, label in mine.values())  # tumor-free.
  # The staging is gone; a rerun reuses the output.
  assert not (out / ".staging").exists()
  stamp = os.stat(out / "manifest.json").st_mtime_ns
  again = healthy_volumes.run(phantom_2020.data_dir, str(out), cfg)
  assert again["fingerprint"] == manifest["fingerprint"]
  assert os.stat(out / "manifest.json").st_mtime_ns == stamp


def test_a_volume_without_segmentation_gives_every_brain_slice(
    phantom_2020, preprocessed_2020, cfg, tmp_path):
  data_dir, regular = preprocessed_2020
  theirs = _split(data_dir)
  # Two cases with healthy slices in the regular split: one keeps its seg.
  ids = sorted({k.split("/")[0] for k in theirs})[:2]
  flat = _flat(phantom_2020, tmp_path, with_seg=ids[:1], without_seg=ids[1:])
  cfg = {**cfg, "healthy_slices_per_volume": 0}  # no cap per volume.
  manifest = healthy_volumes.run(str(flat), str(tmp_path / "out"), cfg)
  mine = _split(tmp_path / "out")
  assert {c["case_id"]: c["segmentation"] for c in manifest["cases"]} == {
      ids[0]: True, ids[1]: False}
  for case_id in ids:
    vol = nib.load(str(flat / (_stem(case_id, "t2") + ".nii.gz"))).get_fdata()
    stride = max(1, round(cfg["slice_stride_mm"] / nib.load(
        str(flat / (_stem(case_id, "t2") + ".nii.gz"))).header.get_zooms()[2]))
    brainy = [z for z in range(0, vol.shape[2], stride)
              if np.count_nonzero(vol[:, :, z]) >= cfg["healthy_min_brain_frac"]
              * vol.shape[0] * vol.shape[1]]
    got = sorted(int(k.split("/")[1]) for k in mine if k.split("/")[0] == case_id)
    if case_id == ids[1]:
      assert got == brainy  # no segmentation: every slice with enough brain.
    else:
      seg = nib.load(str(flat / (_stem(case_id, "seg") + ".nii.gz"))).get_fdata()
      tumor_z = set(np.flatnonzero(seg.any(axis=(0, 1))).tolist())
      assert tumor_z and got and set(got) <= set(brainy) - tumor_z
      assert len(got) < len(brainy)  # the tumor's slices (and gap) are left out.
  # The same normalisation and grid as preprocessing, with or without seg.
  shared = [k for k in theirs if k in mine]
  assert {k.split("/")[0] for k in shared} == set(ids)
  for key in shared:
    np.testing.assert_array_equal(mine[key][0], theirs[key][0])


def test_the_real_case_folder_gives_tumor_free_slices(cfg, tmp_path):
  """The real BraTS-space case (TCGA barcode folder, no name_mapping.csv).

  The repo's small derivative of it (tests/data/README.md: 3 mm voxels).
  """
  own = tmp_path / "own"
  own.mkdir()
  os.symlink(REAL_FIXTURE, own / REAL_ID)
  manifest = healthy_volumes.run(str(own), str(tmp_path / "out"), cfg)
  seg_img = nib.load(os.path.join(REAL_FIXTURE, f"{REAL_ID}_seg.nii.gz"))
  tumor_z = np.flatnonzero(seg_img.get_fdata().any(axis=(0, 1)))
  dz = seg_img.header.get_zooms()[2]
  got = [z for _, z in manifest["slices"]["healthy"]]
  assert got and manifest["cases"][0]["segmentation"]
  # Tumor-free and at least healthy_min_gap_mm from the tumor.
  assert all(np.min(np.abs(tumor_z - z)) * dz >= cfg["healthy_min_gap_mm"] for z in got)
  images = slice_sets.load_split(str(tmp_path / "out"), "healthy")["image"]
  assert images.shape[1:] == (cfg["image_size"],) * 2 + (1,)
  assert images.min() == -1.0 and images.max() <= 1.0


def _as_axes(src, dst, axcodes):
  """The NIfTI at `src` stored in another voxel order, same world positions."""
  img = nib.load(src)
  data = np.asanyarray(img.dataobj)
  turn = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                         nib.orientations.axcodes2ornt(axcodes))
  moved = nib.orientations.apply_orientation(data, turn)
  write_nifti(dst, moved, img.affine @ nib.orientations.inv_ornt_aff(turn, data.shape))
  assert nib.aff2axcodes(nib.load(dst).affine) == axcodes


def test_another_axis_order_is_reoriented_to_brats(phantom_2020, cfg, tmp_path):
  case_id = phantom_2020.case_ids[0]
  flat = _flat(phantom_2020, tmp_path, with_seg=[case_id], without_seg=[])
  for modality in ("t2", "seg"):
    _as_axes(str(flat / (_stem(case_id, modality) + ".nii.gz")),
             str(flat / f"turned_{modality}.nii.gz"), ("S", "R", "A"))
  os.rename(flat / "turned_t2.nii.gz", flat / "turned.nii.gz")
  healthy_volumes.run(str(flat), str(tmp_path / "out"), cfg)
  mine = _split(tmp_path / "out")
  plain = {k.split("/")[1]: v for k, v in mine.items() if k.startswith(case_id + "/")}
  turned = {k.split("/")[1]: v for k, v in mine.items() if k.startswith("turned/")}
  assert plain and set(plain) == set(turned)
  for z, (image, brain, _) in plain.items():
    np.testing.assert_array_equal(turned[z][0], image)
    np.testing.assert_array_equal(turned[z][1], brain)
  assert not (tmp_path / "out" / ".staging").exists()  # the copies are gone.


def test_other_volumes_are_refused_and_overwrite_redoes(phantom_2020, cfg, tmp_path):
  ids = phantom_2020.case_ids[:2]
  flat = _flat(phantom_2020, tmp_path, with_seg=[], without_seg=ids[:1])
  out = str(tmp_path / "out")
  first = healthy_volumes.run(str(flat), out, cfg)
  shutil.copy(os.path.join(phantom_2020.data_dir, ids[1], _stem(ids[1], "t2") + ".nii.gz"),
              flat)
  with pytest.raises(errors.RunMismatch, match="input_files: '1 cases") as e:
    healthy_volumes.run(str(flat), out, cfg)
  assert "--overwrite" in str(e.value)
  with pytest.raises(errors.RunMismatch, match="config.healthy_min_brain_frac"):
    healthy_volumes.run(str(flat), out, {**cfg, "healthy_min_brain_frac": 0.5})
  redone = healthy_volumes.run(str(flat), out, cfg, overwrite=True)
  assert redone["fingerprint"] != first["fingerprint"]
  assert len(redone["cases"]) == 2
  # Fields that only shape the private splits do not count.
  again = healthy_volumes.run(str(flat), out, {**cfg, "test_fraction": 0.5})
  assert again["fingerprint"] == redone["fingerprint"]


# --- Bad input: a UserError naming the file ---------------------------------------

SHAPE = (24, 24, 20)


def _volume(value=None):
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
  brain = (grid ** 2).sum(0) < 0.8
  vol = np.where(brain, 500.0, 0.0).astype(np.float32)
  return vol if value is None else np.where(brain, value, 0).astype(np.float32)


def _garbage(path):
  with open(path, "wb") as f:
    f.write(gzip.compress(b"not a nifti file" * 20))


def _truncated(path):
  write_nifti(path, _volume())
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


BAD = {
    "garbage": (_garbage, "not a readable NIfTI"),
    "truncated": (_truncated, "truncated|not a readable"),
    "nan": (lambda p: write_nifti(p, _volume(np.nan)), "non-finite"),
    "empty_brain": (lambda p: write_nifti(p, np.zeros(SHAPE, np.float32)), "empty brain"),
    "four_d": (lambda p: write_nifti(p, np.stack([_volume()] * 2, -1)),
               "expected a 3D volume"),
    "two_d": (lambda p: write_nifti(p, _volume()[:, :, 0]), "expected a 3D volume"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_volume_is_refused_naming_it(kind, cfg, tmp_path):
  flat = tmp_path / "flat"
  flat.mkdir()
  write_nifti(str(flat / "good.nii.gz"), _volume())
  bad = str(flat / "bad_t2.nii.gz")
  make, reason = BAD[kind]
  make(bad)
  with pytest.raises(brats.BratsDataError, match=reason) as e:
    healthy_volumes.run(str(flat), str(tmp_path / "out"), cfg)
  assert isinstance(e.value, errors.UserError) and e.value.path == bad
  assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["shape", "labels", "orphan"])
def test_a_bad_segmentation_is_refused_naming_it(kind, cfg, tmp_path):
  flat = tmp_path / "flat"
  flat.mkdir()
  write_nifti(str(flat / "subject.nii.gz"), _volume())
  seg = np.zeros(SHAPE, np.uint8)
  if kind == "shape":
    seg = seg[:, :, :10]
  if kind == "labels":
    seg[10:12, 10:12, 5] = 7
  name = "other_seg.nii.gz" if kind == "orphan" else "subject_seg.nii.gz"
  write_nifti(str(flat / name), seg)
  match = {"shape": "differs from", "labels": r"label values \[7\]",
           "orphan": "without its volume"}[kind]
  with pytest.raises(brats.BratsDataError, match=match) as e:
    healthy_volumes.run(str(flat), str(tmp_path / "out"), cfg)
  assert e.value.path == str(flat / name)


def test_folders_without_volumes_or_healthy_slices_are_refused(cfg, tmp_path):
  empty = tmp_path / "empty"
  (empty / "notes").mkdir(parents=True)
  (empty / "notes" / "readme.txt").write_text("no volumes")
  with pytest.raises(brats.BratsDataError, match="no NIfTI volume found") as e:
    healthy_volumes.run(str(empty), str(tmp_path / "out"), cfg)
  assert e.value.path == str(empty)
  with pytest.raises(brats.BratsDataError, match="not a directory"):
    healthy_volumes.run(str(tmp_path / "missing"), str(tmp_path / "out"), cfg)
  both = tmp_path / "both"
  (both / "case1").mkdir(parents=True)
  write_nifti(str(both / "case1" / "case1_t2.nii.gz"), _volume())
  write_nifti(str(both / "loose.nii.gz"), _volume())
  with pytest.raises(brats.BratsDataError, match="give one layout"):
    healthy_volumes.run(str(both), str(tmp_path / "out"), cfg)
  # A thin slab of brain: no slice has healthy_min_brain_frac of brain.
  thin = tmp_path / "thin"
  thin.mkdir()
  vol = np.zeros(SHAPE, np.float32)
  vol[10:12, 10:12, :] = 300
  write_nifti(str(thin / "subject.nii.gz"), vol)
  with pytest.raises(brats.BratsDataError, match="no healthy slice in 1 volume"):
    healthy_volumes.run(str(thin), str(tmp_path / "out"), cfg)


# --- The binary's preprocessing: G2's image size and modalities ---------------------


def _fake_export(path, image_size, modalities=("t2",)):
  """Just the model.json part healthy_from_volumes reads (no weights)."""
  os.makedirs(path)
  with open(os.path.join(path, model_io.MODEL_JSON), "w") as f:
    json.dump({"format": model_io.FORMAT, "config": {
        "data": {"image_size": image_size, "modalities": list(modalities)}}}, f)
  return str(path)


def test_the_binary_slices_at_g2s_image_size_into_the_private_part(phantom_2020, tmp_path):
  from configs import tiny
  config = tiny.get_config()
  config.data.formats = ("array_record",)
  export = _fake_export(tmp_path / "g2_model", 16)
  out = healthy_nifti.healthy_from_volumes(
      config, export, str(tmp_path / "w2"), phantom_2020.data_dir, progress=False)
  assert out == str(tmp_path / "w2" / "private" / "healthy_slices")
  manifest = slice_sets.load_manifest(out)
  assert manifest["image_size"] == 16 != config.data.image_size
  assert slice_sets.load_split(out, "healthy")["image"].shape[1:] == (16, 16, 1)
  multi = _fake_export(tmp_path / "g2_multi", 16, ("t2", "flair"))
  flat = _flat(phantom_2020, tmp_path, with_seg=[],
               without_seg=phantom_2020.case_ids[:1])
  with pytest.raises(brats.BratsDataError, match="modalities"):
    healthy_nifti.healthy_from_volumes(config, multi, str(tmp_path / "w3"), str(flat))
  # Case folders hold every modality: a T2 + FLAIR G2 gets two channels.
  both = healthy_nifti.healthy_from_volumes(config, multi, str(tmp_path / "w5"),
                                            phantom_2020.data_dir, progress=False)
  assert slice_sets.load_split(both, "healthy")["image"].shape[1:] == (16, 16, 2)
  with pytest.raises(model_io.ModelError, match="not an exported model"):
    healthy_nifti.healthy_from_volumes(config, str(tmp_path), str(tmp_path / "w4"),
                                       str(flat))
  assert not (tmp_path / "w4").exists()  # refused before anything was written.


# --- The binary end to end ---------------------------------------------------------


@pytest.mark.slow
def test_binary_synthesizes_from_volumes_and_shares_no_file_name(
    phantom_2020, preprocessed_2020, tmp_path):
  """launch.synthesize_local --healthy_nifti with a fresh-weights G2 export."""
  from tests import test_g2
  from tests import test_local_synthesis
  data_dir, _ = preprocessed_2020
  synthetic = test_g2.stand_in_synthetic_set(data_dir, str(tmp_path / "public"))
  export = test_local_synthesis._g2_export(  # pylint: disable=protected-access
      test_local_synthesis._config(), data_dir, synthetic,  # pylint: disable=protected-access
      str(tmp_path / "g2_model"))
  # The institute's volumes: T2 files renamed to identifiable names, no seg.
  volumes = tmp_path / "Hospital_X_volumes"
  volumes.mkdir()
  names = []
  for i, case_id in enumerate(phantom_2020.case_ids[:3]):
    names.append(f"patient_Doe{i}")
    shutil.copy(os.path.join(phantom_2020.data_dir, case_id, _stem(case_id, "t2") + ".nii.gz"),
                volumes / f"{names[-1]}_t2.nii.gz")
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  flags = ["--config=configs/tiny.py", "--config.train.reader=grain",
           "--config.synthesis.backend=pixels", "--config.sampler.steps=5",
           "--config.sampler.resamples=1", "--config.sampler.batch_size=4",
           "--config.synthesis.min_inside_brain=0", "--config.synthesis.figure_rows=0",
           "--config.data.formats=('array_record',)", f"--model_dir={export}",
           f"--tumors_dir={synthetic}", f"--workdir={tmp_path / 'w2'}", "--mode=generate"]

  def synthesize(*extra):
    return subprocess.run([sys.executable, "-m", "launch.synthesize_local", *flags, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

  both = synthesize(f"--healthy_nifti={volumes}", f"--healthy_dir={data_dir}")
  assert both.returncode != 0 and "healthy_dir" in both.stderr
  done = synthesize(f"--healthy_nifti={volumes}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "local synthesis (generate) done" in done.stdout
  own = tmp_path / "w2" / "private" / "healthy_slices"
  healthy = slice_sets.load_split(str(own), "healthy")
  assert {k.split("/")[0] for k in healthy["key"]} == set(names)
  n = slice_sets.load_manifest(synthetic)["splits"]["CBICA_synthetic"]["num_slices"]
  shared = tmp_path / "w2" / "synthetic"
  # No path, folder or file name of the volumes in the shareable part: not in
  # its text files (the shards are compressed: their examples are read) ...
  needles = [str(volumes), volumes.name, "Doe", *names, *phantom_2020.case_ids[:3]]
  texts = [p for p in shared.rglob("*") if p.is_file() and p.suffix in (".json", ".md",
                                                                          ".txt")]
  assert {"manifest.json", "summary.json"} <= {p.name for p in texts}
  for path in texts:
    for needle in needles:
      assert needle not in path.read_text(), (needle, path)
  # ... nor in any example's text fields: the healthy slice is a salted hash.
  salt = (tmp_path / "w2" / "private" / "salt").read_text().strip()
  hashed = {pipeline.salted_hash(k, salt) for k in healthy["key"]}
  examples = list(input_pipeline.read_examples(str(shared), "CBICA_synthetic", "grain"))
  assert len(examples) == test_local_synthesis.K * n
  for e in examples:
    assert e["healthy"] in hashed
    for value in e.values():
      if isinstance(value, str):
        assert not any(needle in value for needle in needles), value
  again = synthesize(f"--healthy_nifti={volumes}")
  assert again.returncode == 0 and "reused" in again.stdout, again.stderr[-3000:]
