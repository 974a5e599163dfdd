"""Readers: tf.data vs TF-free equivalence, process shards, batching, synthetic."""

import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import input_pipeline
from tests.conftest import ROOT

FIELDS = ("image", "mask", "label", "brain", "slice_index", "case_id", "center")


@pytest.mark.parametrize("split", ["CBICA_train", "TCIA_test", "healthy"])
def test_tf_and_grain_readers_return_identical_examples(preprocessed_2020, split):
  out, manifest = preprocessed_2020
  tf_examples = {e["key"]: e for e in input_pipeline.read_examples(out, split, "tf")}
  grain_examples = {e["key"]: e
                    for e in input_pipeline.read_examples(out, split, "grain")}
  assert len(tf_examples) == manifest["splits"][split]["num_slices"]
  assert set(tf_examples) == set(grain_examples)
  for key, a in tf_examples.items():
    b = grain_examples[key]
    for field in FIELDS:
      np.testing.assert_array_equal(a[field], b[field], err_msg=f"{key}/{field}")


@pytest.mark.parametrize("reader,count", [("grain", 3), ("tf", 2), ("grain", 1)])
def test_process_shards_are_disjoint_and_cover_the_split(preprocessed_2020,
                                                         reader, count):
  out, manifest = preprocessed_2020
  shards = [[e["key"] for e in input_pipeline.read_examples(out, "healthy", reader, i, count)]
            for i in range(count)]
  keys = [k for shard in shards for k in shard]
  assert len(keys) == len(set(keys))  # disjoint.
  assert len(keys) == manifest["splits"]["healthy"]["num_slices"]  # cover.
  sizes = [len(s) for s in shards]
  assert max(sizes) - min(sizes) <= 1


def test_shards_match_between_readers(preprocessed_2020):
  out, _ = preprocessed_2020
  for i in range(2):
    a = [e["key"] for e in input_pipeline.read_examples(out, "healthy", "tf", i, 2)]
    b = [e["key"] for e in input_pipeline.read_examples(out, "healthy", "grain", i, 2)]
    assert a == b


@pytest.mark.parametrize("reader", ["grain", "tf"])
def test_batches_shuffle_repeat(preprocessed_2020, reader):
  out, manifest = preprocessed_2020
  n = manifest["splits"]["healthy"]["num_slices"]
  size = manifest["image_size"]

  def first_keys(seed, num_batches):
    it = input_pipeline.get_batches(out, "healthy", batch_size=4, reader=reader,
                                    seed=seed)
    batches = [next(it) for _ in range(num_batches)]
    return batches, [k for b in batches for k in b["key"]]

  batches, keys = first_keys(0, num_batches=n // 4 + 2)  # crosses an epoch.
  b = batches[0]
  assert b["image"].shape == (4, size, size, 1) and b["image"].dtype == np.float32
  assert b["mask"].shape == (4, size, size, 1) and b["slice_index"].shape == (4,)
  assert set(keys[: n - n % 4]) <= set(keys) and len(set(keys)) == n
  _, again = first_keys(0, 3)
  assert again == keys[:12]
  _, other = first_keys(1, 3)
  assert other != keys[:12]


def test_no_repeat_no_drop_gives_every_example_once(preprocessed_2020):
  out, manifest = preprocessed_2020
  batches = list(input_pipeline.get_batches(
      out, "CBICA_train", batch_size=3, shuffle=False, repeat=False,
      drop_remainder=False))
  keys = [k for b in batches for k in b["key"]]
  assert sorted(keys) == sorted(k for k, _ in [
      (f"{c}/{z:03d}", 0) for c, z in manifest["slices"]["CBICA_train"]])


def test_missing_split_and_missing_output_are_clear(preprocessed_2020, tmp_path):
  out, _ = preprocessed_2020
  with pytest.raises(KeyError, match="no split 'XYZ_train'"):
    next(input_pipeline.read_examples(out, "XYZ_train"))
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    next(input_pipeline.get_batches(str(tmp_path), "healthy", batch_size=2))


def test_synthetic_source_is_seeded_sharded_and_typed():
  def keys(index, count, seed=0):
    it = input_pipeline.get_batches(
        None, "train", batch_size=4, reader="synthetic", seed=seed,
        repeat=False, process_index=index, process_count=count,
        synthetic={"num_examples": 32, "image_size": 32})
    return [b for b in it]

  full = keys(0, 1)
  assert len(full) == 8
  b = full[0]
  assert b["image"].shape == (4, 32, 32, 1) and b["mask"].dtype == np.uint8
  assert np.all(b["mask"].reshape(4, -1).sum(1) > 0)
  np.testing.assert_array_equal(b["image"], keys(0, 1)[0]["image"])
  shard_keys = [set(k for bb in keys(i, 2) for k in bb["key"]) for i in range(2)]
  assert not shard_keys[0] & shard_keys[1]
  assert len(shard_keys[0] | shard_keys[1]) == 32
  healthy = next(input_pipeline.get_batches(
      None, "healthy", batch_size=2, reader="synthetic",
      synthetic={"image_size": 16}))
  assert healthy["mask"].sum() == 0


def test_tf_free_readers_never_import_tensorflow(preprocessed_2020):
  out, _ = preprocessed_2020
  code = (
      "import sys\n"
      # The data layer's own modules never import JAX (grain, once used, does).
      "from data_pipeline import input_pipeline as ip, phantom, preprocess\n"
      "assert 'jax' not in sys.modules, 'jax was imported'\n"
      f"b = next(ip.get_batches({out!r}, 'healthy', batch_size=2, reader='grain'))\n"
      "s = next(ip.get_batches(None, 'x', batch_size=2, reader='synthetic'))\n"
      "assert b['image'].shape[0] == 2 and s['image'].shape[0] == 2\n"
      "from data_pipeline import slice_sets\n"
      f"h = slice_sets.load_split({out!r}, 'healthy')\n"
      "assert h['image'].dtype.name == 'float32'\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
      "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith("ok")
