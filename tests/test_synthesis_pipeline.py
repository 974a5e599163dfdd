"""Matching + placement + generation for a center's tumors (synthesis/pipeline.py)."""

import numpy as np
import pytest

from data_pipeline import input_pipeline
from dfgm_jax.diffusion import sampler
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import matching
from dfgm_jax.synthesis import pipeline
from dfgm_jax.synthesis import runner


def _data(n_bank=10, n_tumor=3, s=32):
  h = [input_pipeline.synthetic_example(i, s, tumor=False, seed=5) for i in range(n_bank)]
  t = [input_pipeline.synthetic_example(i, s, tumor=True, seed=6) for i in range(n_tumor)]
  tumors = {"image": np.stack([e["image"] for e in t]),
            "mask": np.stack([e["mask"] for e in t]),
            "case_id": [f"BraTS20_Training_{i:03d}" for i in range(n_tumor)],
            "center": ["CBICA"] * n_tumor, "slice_index": [70] * n_tumor}
  bank = pipeline.build_bank(np.stack([e["image"] for e in h]),
                             np.stack([e["brain"] for e in h]).astype(np.float32),
                             [f"BraTS20_Training_{100 + i}" for i in range(n_bank)],
                             [e["key"] for e in h], "pixels")
  return bank, tumors


def _eps_factory(params):
  import jax.numpy as jnp
  return lambda x, t, c, r, m: params["w"] * jnp.tanh(x)


@pytest.mark.parametrize("mode", ["dfgm", "cutpaste"])
def test_synthesize_pairs_keep_background_and_hide_ids(mode):
  bank, tumors = _data()
  settings = pipeline.SynthesisSettings(
      mode=mode, match=matching.MatchConfig(backend="pixels", k=2), r_out=1,
      batch_size=4, salt="center-secret")
  sched = schedule_lib.make_schedule("linear", 20)
  out = runner.synthesize(settings, bank, tumors, _eps_factory, {"w": np.float32(0.3)},
                            sched, sampler.SamplerConfig(steps=4, resamples=1))
  n = len(out["image"])
  assert n == 6 and out["mask"].shape == (6, 32, 32, 1)
  assert sorted(out["rank"]) == [0, 0, 0, 1, 1, 1]
  for i in range(n):
    j = [k for k in bank.keys if pipeline.salted_hash(k, "center-secret") == out["healthy"][i]]
    assert len(j) == 1
    h = bank.images[bank.keys.index(j[0])]
    d = np.asarray(masks.dilate(out["mask"][i:i + 1].astype(np.float32), 1))[0] > 0
    np.testing.assert_array_equal(out["image"][i][~d], h[~d])
  for field in ("source", "healthy"):
    assert all("BraTS" not in v and len(v) == 16 for v in out[field])
  # Per-slice pseudonyms by default: no slice index, no patient grouping.
  first = (tumors["case_id"][0], tumors["slice_index"][0])
  assert (out["source"][0], out["slice_index"][0]) == (
      pipeline.salted_hash(f"{first[0]}/{first[1]}", "center-secret"), -1)
  assert set(out["slice_index"]) == {pipeline.NO_SLICE_INDEX}


def test_bank_cache_is_reused(tmp_path):
  bank, _ = _data()
  path = str(tmp_path / "bank.npz")
  a = pipeline.build_bank(bank.images, bank.brain, ["a"] * 10, bank.keys, "pixels",
                          cache_path=path)
  np.savez(path, features=a.features * 0 + 7, fingerprint=np.load(path)["fingerprint"])
  b = pipeline.build_bank(bank.images, bank.brain, ["a"] * 10, bank.keys, "pixels",
                          cache_path=path)
  assert np.all(b.features == 7)  # read from the cache, not recomputed.
  c = pipeline.build_bank(bank.images, bank.brain, ["a"] * 10, bank.keys[::-1], "pixels",
                          cache_path=path)
  assert not np.all(c.features == 7)  # another bank: recomputed.


def test_the_bank_cache_is_keyed_on_the_seed_only_where_features_depend_on_it():
  keys = ["k0", "k1"]
  # The seeded random VGG trunk: another seed, other features, another key.
  assert (pipeline.bank_fingerprint(keys, "vgg16_random", 0)
          != pipeline.bank_fingerprint(keys, "vgg16_random", 1))
  # ImageNet weights and pixels do not depend on it: the cache stays valid.
  for backend in ("vgg16_imagenet", "pixels"):
    assert (pipeline.bank_fingerprint(keys, backend, 0)
            == pipeline.bank_fingerprint(keys, backend, 1))
  assert (pipeline.bank_fingerprint(keys, "pixels", 0)
          != pipeline.bank_fingerprint(keys[::-1], "pixels", 0))


def test_center_without_valid_matches_gives_an_empty_set():
  bank, tumors = _data()
  settings = pipeline.SynthesisSettings(
      mode="dfgm", match=matching.MatchConfig(backend="pixels", k=2, min_inside_brain=1.5),
      r_out=1, batch_size=4)
  sched = schedule_lib.make_schedule("linear", 20)
  out = runner.synthesize(settings, bank, tumors, _eps_factory, {"w": np.float32(0.3)},
                          sched, sampler.SamplerConfig(steps=4, resamples=1))
  assert out["image"].shape == (0, 32, 32, 1) and out["mask"].shape == (0, 32, 32, 1)
  assert out["source"] == [] and out["rank"] == []


def test_batch_store_reads_only_complete_files(tmp_path):
  store = runner.BatchStore(str(tmp_path / "c"))
  assert store.load_plan() is None and not store.has(0)
  store.save_plan(np.array([[0, 1, 0]], np.int32))
  store.save_batch(0, np.ones((1, 4, 4, 1), np.float32), np.ones((1, 4, 4, 1), np.uint8), 1.5)
  (tmp_path / "c" / "b000001.npz.tmp.npz").write_bytes(b"cut short")
  assert store.has(0) and not store.has(1)
  assert store.load_batch(0)["seconds"] == 1.5
  np.testing.assert_array_equal(store.load_plan(), [[0, 1, 0]])


def _left_half_bank(bank):
  """The bank with every brain cut to the image's left half."""
  brain = bank.brain.copy()
  brain[:, :, brain.shape[2] // 2:] = 0
  return pipeline.MemoryBank(bank.images, brain, bank.patients, bank.keys,
                             bank.features, bank.backend)


def test_hflip_never_places_a_tumor_outside_the_brain():
  bank, tumors = _data(n_tumor=6)
  # Tumors on the left half only, so that they fit the left-half brains.
  tumors["mask"][:, :, 16:] = 0
  bank = _left_half_bank(bank)
  for placement in ("same", "random_shift"):
    settings = pipeline.SynthesisSettings(
        mode="cutpaste", match=matching.MatchConfig(backend="pixels", k=2, min_inside_brain=0.9),
        placement=placement, hflip=True, r_out=1, batch_size=4)
    pairs, skipped = pipeline.plan_pairs(settings, bank, tumors)
    assert len(pairs) > 0 and skipped == 0
    inputs = pipeline.compose_pairs(settings, bank, tumors, pairs)
    for t, (_, j, _) in zip(inputs["tumor"], pairs):
      assert t.sum() > 0 and (t * bank.brain[j]).sum() / t.sum() >= 0.9


def test_pairs_that_cannot_be_placed_are_skipped_and_counted(monkeypatch):
  bank, tumors = _data()
  settings = pipeline.SynthesisSettings(
      mode="cutpaste", match=matching.MatchConfig(backend="pixels", k=2),
      placement="random_shift", r_out=1, batch_size=4)
  place = pipeline.compose.place

  def refuse_first_tumor(x, tumor, *args, **kwargs):
    x2, t2, ok = place(x, tumor, *args, **kwargs)
    return x2, t2, ok and not np.array_equal(tumor, tumors["mask"][0])

  monkeypatch.setattr(pipeline.compose, "place", refuse_first_tumor)
  pairs, skipped = pipeline.plan_pairs(settings, bank, tumors)
  assert skipped == 2 and 0 not in pairs[:, 0] and len(pairs) == 4
  store = runner.BatchStore(None)
  np.testing.assert_array_equal(runner.agreed_plan(store, lambda: (pairs, skipped)), pairs)
  assert store.skipped() == 2


def test_ring_mean_intensity_matching():
  bank, tumors = _data()
  pairs = np.array([[0, 3, 0], [1, 5, 1]], np.int32)
  base = dict(mode="cutpaste", match=matching.MatchConfig(backend="pixels", k=2), r_out=2)
  plain = pipeline.compose_pairs(pipeline.SynthesisSettings(**base), bank, tumors, pairs)
  matched = pipeline.compose_pairs(
      pipeline.SynthesisSettings(**base, intensity_match="ring_mean"), bank, tumors, pairs)
  np.testing.assert_array_equal(plain["x"][0], tumors["image"][0])
  for i in range(2):
    ring = np.asarray(masks.ring(matched["tumor"][i:i + 1], 2))[0, ..., 0] > 0
    assert ring.any()
    x, h = matched["x"][i], matched["h"][i]
    assert abs((x[ring] + 1).mean() - (h[ring] + 1).mean()) < 1e-3
    assert abs((plain["x"][i][ring] + 1).mean() - (h[ring] + 1).mean()) > 1e-2
  with pytest.raises(ValueError, match="intensity_match"):
    pipeline.compose_pairs(pipeline.SynthesisSettings(**base, intensity_match="histogram"),
                           bank, tumors, pairs)


def test_non_finite_network_output_fails_naming_center_and_batch():
  import jax.numpy as jnp
  bank, tumors = _data()
  settings = pipeline.SynthesisSettings(
      mode="dfgm", match=matching.MatchConfig(backend="pixels", k=2), r_out=1, batch_size=4)
  sched = schedule_lib.make_schedule("linear", 20)
  with pytest.raises(runner.NonFiniteOutput, match=r"TCIA: batch 0 of 2"):
    runner.synthesize(settings, bank, tumors, lambda p: lambda x, t, c, r, m: x * jnp.nan,
                      {"w": np.float32(0.3)}, sched,
                      sampler.SamplerConfig(steps=4, resamples=1), name="TCIA")
