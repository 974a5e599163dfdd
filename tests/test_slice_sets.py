"""Slice sets: one way to read a split into memory, one writer, clear refusals."""

import os

import numpy as np
import pytest

from data_pipeline import builder
from data_pipeline import input_pipeline
from data_pipeline import slice_sets
from dfgm_jax import errors


def test_load_split_holds_the_split_in_memory(preprocessed_2020):
  out, manifest = preprocessed_2020
  split = "CBICA_train"
  held = slice_sets.load_split(out, split)
  examples = list(input_pipeline.read_examples(out, split))
  n = manifest["splits"][split]["num_slices"]
  s = manifest["image_size"]
  assert held["image"].shape == (n, s, s, 1) and held["image"].dtype == np.float32
  for name in ("mask", "brain"):
    assert held[name].shape == (n, s, s, 1) and held[name].dtype == np.float32
  np.testing.assert_array_equal(held["image"], np.stack([e["image"] for e in examples]))
  np.testing.assert_array_equal(held["mask"], np.stack([e["mask"] for e in examples]))
  assert held["key"] == [e["key"] for e in examples]
  assert held["case_id"] == [e["case_id"] for e in examples]
  assert held["center"] == ["CBICA"] * n
  assert held["slice_index"] == [int(e["slice_index"]) for e in examples]
  assert all(type(z) is int for z in held["slice_index"])  # pylint: disable=unidiomatic-typecheck
  # Process shards are disjoint and cover the split.
  shards = [slice_sets.SliceData(out).load_split(split, i, 2)["key"] for i in range(2)]
  assert shards[0] + shards[1] == held["key"]


def test_a_split_that_does_not_exist_names_the_ones_that_do(preprocessed_2020):
  out, _ = preprocessed_2020
  data = slice_sets.SliceData(out)
  with pytest.raises(errors.UserError) as e:
    data.load_split("BraTS2021_train")
  message = str(e.value)
  assert "'BraTS2021_train'" in message and "'CBICA_train'" in message
  assert "'healthy'" in message and message.startswith(out)
  n = data.split_size("healthy")
  assert n == data.manifest["splits"]["healthy"]["num_slices"] > 0
  with pytest.raises(errors.UserError, match=f"'healthy' has {n} examples, "
                     f"too few for {n + 1} processes"):
    data.load_split("healthy", 0, n + 1)


def _refusal(path):
  with pytest.raises(errors.UserError) as e:
    slice_sets.load_manifest(str(path))
  assert str(e.value).startswith(f"{path}: no manifest.json")
  return str(e.value)


def test_a_folder_without_manifest_gets_the_advice_that_fits_it(tmp_path):
  # A synthetic set whose synthesis stopped while building its shards.
  synthetic = tmp_path / "synthetic"
  (synthetic / slice_sets.BUILD / "array_record" / builder.SYNTHETIC_NAME).mkdir(parents=True)
  message = _refusal(synthetic)
  assert "launch.synthesize" in message and "launch.preprocess" not in message
  # The same with only its summary written (any folder name).
  other = tmp_path / "out2"
  other.mkdir()
  (other / "summary.json").write_text("{}")
  assert "launch.synthesize" in _refusal(other)
  # Preprocessing interrupted after staging cases.
  slices = tmp_path / "slices"
  (slices / ".staging" / "0123abcd").mkdir(parents=True)
  (slices / ".staging" / "0123abcd" / "BraTS20_Training_001.npz").write_bytes(b"")
  message = _refusal(slices)
  assert "launch.preprocess" in message and "launch.synthesize" not in message
  # Preprocessing interrupted while moving its formats into place.
  (slices / "tfrecord" / builder.DATASET_NAME).mkdir(parents=True)
  assert "rerun launch.preprocess" in _refusal(slices)
  # Raw data passed where slices were expected.
  raw = tmp_path / "raw"
  (raw / "MICCAI_BraTS2020_TrainingData").mkdir(parents=True)
  assert "raw BraTS data" in _refusal(raw)
  # Anything else: say what is there and what is missing.
  unknown = tmp_path / "unknown"
  unknown.mkdir()
  (unknown / "notes.txt").write_text("x")
  message = _refusal(unknown)
  assert "notes.txt" in message and "tfrecord/" in message
  assert "rerun" not in message
  # An empty synthetic folder (synthesis stopped before writing anything).
  (tmp_path / "w" / "synthetic").mkdir(parents=True)
  assert "launch.synthesize" in _refusal(tmp_path / "w" / "synthetic")
  # The workdir given instead of its slices folder.
  (tmp_path / "w" / "slices").mkdir()
  (tmp_path / "w" / "slices" / "manifest.json").write_text("{}")
  assert "finished sets in slices/" in _refusal(tmp_path / "w")
  assert "does not exist" in _refusal(tmp_path / "missing")
  assert "empty" in _refusal(tmp_path / "raw" / "MICCAI_BraTS2020_TrainingData")


def _results(n, size=8, channels=2, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (n, size, size, channels)).astype(np.float32),
          "mask": (rng.uniform(size=(n, size, size, 1)) > 0.5).astype(np.float32),
          "source": [f"src{i % 2}" for i in range(n)], "center": ["CBICA"] * n,
          "slice_index": [10 + i for i in range(n)],
          "healthy": [f"h{i}" for i in range(n)], "rank": [i % 2 for i in range(n)]}


def test_write_synthetic_set_builds_aside_and_reads_back(tmp_path, preprocessed_2020):
  out = tmp_path / "synthetic"
  out.mkdir()
  results = {"CBICA": _results(3), "TCIA": _results(0)}
  data = slice_sets.SliceData(preprocessed_2020[0])
  formats = data.write_synthetic_set(str(out), results, image_size=8, channels=2,
                                     mode="dfgm", model_step=7,
                                     formats=("array_record",))
  assert formats == {"array_record": f"array_record/{builder.SYNTHETIC_NAME}/1.0.0"}
  assert sorted(os.listdir(out)) == ["array_record"]  # .build is gone.
  (out / "manifest.json").write_text(
      '{"dataset": "synthetic_slices", "image_size": 8, "channels": 2, '
      '"splits": {"CBICA_synthetic": {"num_slices": 3}}}')
  held = slice_sets.load_split(str(out), "CBICA_synthetic")
  # TFDS stores examples in the order of their keys' hashes.
  expected_keys = ["src0/010/0", "src1/011/1", "src0/012/0"]
  order = [expected_keys.index(k) for k in held["key"]]
  assert sorted(order) == [0, 1, 2]
  np.testing.assert_array_equal(held["image"], results["CBICA"]["image"][order])
  np.testing.assert_array_equal(held["mask"], results["CBICA"]["mask"][order])
  assert held["healthy"] == [f"h{i}" for i in order]
  assert held["rank"] == [i % 2 for i in order]
  assert held["slice_index"] == [10 + i for i in order]
  assert held["mode"] == ["dfgm"] * 3 and held["model_step"] == [7] * 3
  # A rewrite replaces the set in place.
  data.write_synthetic_set(str(out), {"CBICA": _results(3, seed=1)}, image_size=8,
                           channels=2, mode="dfgm", model_step=8,
                           formats=("array_record",))
  again = slice_sets.load_split(str(out), "CBICA_synthetic")
  assert again["model_step"] == [8] * 3
  assert sorted(os.listdir(out)) == ["array_record", "manifest.json"]


def test_training_refuses_slices_of_another_size_or_center(preprocessed_2020):
  from configs import tiny
  from launch import train_data
  config = tiny.get_config()
  config.train.reader = "grain"
  config.train.center = "CBICA"
  config.data.image_size = 16  # the slices are 32 x 32.
  with pytest.raises(errors.ConfigError, match=r"config.data.image_size=16: .* 32 x 32"):
    train_data.make_sampler(config, preprocessed_2020[0])
  config.data.image_size = 32
  config.data.modalities = ("t1", "t2")
  with pytest.raises(errors.ConfigError, match=r"config.data.modalities"):
    train_data.make_sampler(config, preprocessed_2020[0])
  config.data.modalities = ("t2",)
  config.train.center = "MDA"  # not a center of the data.
  with pytest.raises(errors.UserError, match=r"no split 'MDA_train'; splits: .*'CBICA_train'"):
    train_data.make_sampler(config, preprocessed_2020[0])
  config.train.center = "CBICA"
  sampler = train_data.make_sampler(config, preprocessed_2020[0])
  assert sampler.batch(0)["image"].shape == (8, 32, 32, 1)
