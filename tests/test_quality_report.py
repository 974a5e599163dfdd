"""The synthesis-quality table: every synthetic set against its center's real tumors.

Stand-in synthetic sets are written through the data layer from the phantom's
CBICA tumor slices (no synthesis stage): an exact cut-paste into healthy
slices (some tumors mirrored or shifted, as placement may do), the same
blurred, and the real slices themselves.
"""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from configs import tiny
from data_pipeline import slice_sets
from dfgm_jax import errors
from dfgm_jax.eval import quality_report
from dfgm_jax.synthesis import pipeline

SALT = "quality-test-salt"
CENTER = "CBICA"


class CountingFeatures:
  """4 x 4 block means of the first channel: cheap features that count calls."""

  name = "block_means"

  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    x = np.asarray(images, np.float64)[..., 0]
    n, s = x.shape[:2]
    return x.reshape(n, s // 4, 4, s // 4, 4).mean(axis=(2, 4)).reshape(n, -1)


def _write(data, out_dir, res, mode):
  """A <CENTER>_synthetic split in the synthetic format, with its manifest."""
  n = len(res["image"])
  formats = data.write_synthetic_set(
      out_dir, {CENTER: res}, image_size=res["image"].shape[1],
      channels=res["image"].shape[-1], mode=mode, model_step=0,
      formats=("array_record",))
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    # As the synthesis stage writes it; formats: <format>/<name>/<version>.
    json.dump({"dataset": formats["array_record"].split("/")[1], "formats": formats,
               "image_size": res["image"].shape[1], "channels": res["image"].shape[-1],
               "splits": {f"{CENTER}_synthetic": {"num_slices": n, "num_cases": n}}}, f)
  return slice_sets.SliceData(out_dir)


def _provenance(src):
  n = len(src["image"])
  return {"source": [pipeline.salted_hash(c, SALT) for c in src["case_id"]],
          "center": [CENTER] * n, "slice_index": list(src["slice_index"]),
          "healthy": [f"h{i}" for i in range(n)], "rank": [0] * n}


_SHIFTS = ((1, -2), (-1, 2), (1, 2), (-1, -2))


def _shift_for(mask):
  """A one-row, two-column shift that moves no tumor pixel across the slice's
  edge (np.roll wraps it around): the phantom's tumors reach the brain's
  border, some near the slice's."""
  m = np.asarray(mask)[..., 0] > 0.5
  for dy, dx in _SHIFTS:
    rows = m[-1:] if dy > 0 else m[:1]
    cols = m[:, -2:] if dx > 0 else m[:, :2]
    if not rows.any() and not cols.any():
      return dy, dx
  raise AssertionError("a tumor touches every edge of its slice")


def _move(i, a, shift):
  """Placement of row i: as it is, mirrored, or shifted (never clipped here)."""
  if i % 3 == 1:
    return a[:, ::-1]
  if i % 3 == 2:
    return np.roll(a, shift, axis=(0, 1))
  return a


@pytest.fixture(scope="module")
def sets(preprocessed_2020, tmp_path_factory):
  data_dir, _ = preprocessed_2020
  real = slice_sets.SliceData(data_dir)
  src, healthy = real.load_split(f"{CENTER}_train"), real.load_split("healthy")
  n = len(src["image"])
  shifts = [_shift_for(a) for a in src["mask"]]
  x = np.stack([_move(i, a, d) for i, (a, d) in enumerate(zip(src["image"], shifts))])
  m = np.stack([_move(i, a, d) for i, (a, d) in enumerate(zip(src["mask"], shifts))])
  h = healthy["image"][np.arange(n) % len(healthy["image"])]
  paste = np.where(m > 0.5, x, h).astype(np.float32)  # compose.cut_paste
  blurred = ndimage.gaussian_filter(paste, sigma=(0, 1.5, 1.5, 0)).astype(np.float32)
  root = tmp_path_factory.mktemp("quality_sets")
  prov = _provenance(src)
  made = {
      "cutpaste": _write(real, str(root / "cutpaste"),
                         {"image": paste, "mask": m.astype(np.uint8), **prov}, "cutpaste"),
      "dfgm": _write(real, str(root / "blurred"),
                     {"image": blurred, "mask": m.astype(np.uint8), **prov}, "dfgm"),
      "real_copy": _write(real, str(root / "real"),
                          {"image": src["image"], "mask": src["mask"].astype(np.uint8),
                           **prov}, "cutpaste"),
      "anomalydiffusion": None,
  }
  return real, made, n


@pytest.fixture(scope="module")
def measured(sets, tmp_path_factory):
  real, synthetic, _ = sets
  workdir = str(tmp_path_factory.mktemp("quality"))
  features = CountingFeatures()
  result = quality_report.run(tiny.get_config(), workdir, real, synthetic, salt=SALT,
                              max_slices=0, feature_fn=features)
  return workdir, features, result


def _ambiguous_rows(real) -> list[int]:
  """Rows of the reference whose tumor mask is its own mirror image (with
  pixels that differ): placed_source cannot tell how they were placed."""
  src = real.load_split(f"{CENTER}_train")
  return [i for i, (x, t) in enumerate(zip(src["image"], src["mask"]))
          if quality_report.placed_source(t, x, t)[1] == "ambiguous"]


def test_cutpaste_preserves_the_tumor_exactly_through_any_placement(sets, measured):
  real, _, n = sets
  cp = measured[2]["sets"]["cutpaste"][CENTER]
  # Every tumor whose placement the masks tell is found and exactly kept;
  # the mirror-symmetric ones are left out as ambiguous, never guessed.
  ambiguous = _ambiguous_rows(real)
  assert cp["preservation_mae"] == 0.0 and cp["preservation_n"] == n - len(ambiguous)
  moves = ["same", "mirrored", "shifted"]
  expected = {m: sum(1 for i in range(n) if i % 3 == k and i not in ambiguous)
              for k, m in enumerate(moves)}
  assert cp["placement"] == {**expected, "mirrored_shifted": 0}
  assert cp["preservation_left_out"] == {"no_source": 0, "tumor_moved": 0,
                                         "ambiguous": len(ambiguous)}
  # Blurring changes the tumor's pixels too.
  assert measured[2]["sets"]["dfgm"][CENTER]["preservation_mae"] > 0.01


def test_a_hard_seam_scores_above_a_smoothed_one(measured):
  numbers = measured[2]["sets"]
  assert numbers["cutpaste"][CENTER]["seam_score"] > numbers["dfgm"][CENTER]["seam_score"]
  # The real slices against themselves: as sharp as real, by definition.
  assert numbers["real_copy"][CENTER]["seam_score"] == pytest.approx(1.0)


def test_the_real_set_itself_is_at_frechet_zero(measured):
  result = measured[2]
  copy, ref = result["sets"]["real_copy"][CENTER], result["reference"][CENTER]
  assert abs(copy["frechet"]) < 1e-6 and abs(copy["frechet_ring"]) < 1e-6
  assert copy["diversity"] == pytest.approx(ref["diversity"])
  assert result["sets"]["cutpaste"][CENTER]["frechet"] > 1e-3
  assert ref["split"] == f"{CENTER}_train" and copy["n"] == ref["n"] == copy["n_features"]


def test_missing_sets_are_listed_and_every_set_is_in_the_table(measured):
  workdir, _, result = measured
  assert result["skipped"] == [{"set": "anomalydiffusion",
                                "reason": "no anomalydiffusion synthetic set"}]
  with open(quality_report.path(workdir)) as f:
    assert json.load(f)["sets"] == result["sets"]
  text = quality_report.table(result)
  for name in ("cutpaste", "dfgm", "real_copy", "anomalydiffusion", "real (CBICA_train)"):
    assert name in text
  assert "Lower is better" in text


def test_rerun_reuses_and_another_identity_is_refused(sets, measured):
  real, synthetic, _ = sets
  workdir, _, first = measured
  config = tiny.get_config()
  features = CountingFeatures()
  again = quality_report.run(config, workdir, real, synthetic, salt=SALT, max_slices=0,
                             feature_fn=features)
  assert again["reused"] and features.calls == 0 and again["sets"] == first["sets"]
  fewer = {k: v for k, v in synthetic.items() if k != "dfgm"}
  with pytest.raises(errors.RunMismatch, match="sets.dfgm"):
    quality_report.run(config, workdir, real, fewer, salt=SALT, max_slices=0,
                       feature_fn=features)
  with pytest.raises(errors.RunMismatch, match="max_slices"):
    quality_report.run(config, workdir, real, synthetic, salt=SALT, max_slices=3,
                       feature_fn=features)
  assert features.calls == 0


def test_overwrite_recomputes_on_a_fixed_subsample(sets, tmp_path):
  real, synthetic, n = sets
  config = tiny.get_config()
  one = {"cutpaste": synthetic["cutpaste"]}
  quality_report.run(config, str(tmp_path), real, one, salt=SALT, max_slices=0,
                     feature_fn=CountingFeatures())
  runs = [quality_report.run(config, str(tmp_path), real, one, salt="another salt",
                             max_slices=4, feature_fn=CountingFeatures(), overwrite=True)
          for _ in range(2)]
  assert not runs[0]["reused"] and runs[1]["reused"] is False  # overwrite redoes it
  first, second = (r["sets"]["cutpaste"][CENTER] for r in runs)
  assert first["n_features"] == 4 and first["n"] == n
  assert runs[0]["reference"][CENTER]["n_features"] == 4
  assert first["frechet"] == second["frechet"]  # the same slices each time
  # A wrong salt finds no source: preservation is left out, and says why.
  assert first["preservation_mae"] is None
  assert first["preservation_left_out"]["no_source"] == n
  assert "10 no source" in quality_report.table(runs[0])


def test_subsample_does_not_depend_on_the_reading_order():
  keys = [f"k{i:02d}" for i in range(20)]
  rows = quality_report.subsample(keys, 5)
  shuffled = keys[::-1]
  again = quality_report.subsample(shuffled, 5)
  assert len(set(rows)) == 5 and sorted(keys[i] for i in rows) == sorted(
      shuffled[i] for i in again)
  assert list(quality_report.subsample(keys, 0)) == list(range(20))


def test_placed_source_reads_the_move_from_the_masks():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32)
  t = np.zeros((16, 16, 1), np.float32)
  t[3:7, 2:5] = 1
  t[3, 5] = 1  # not symmetric left-right
  moved = np.roll(t[:, ::-1], (2, -3), axis=(0, 1))
  got, how = quality_report.placed_source(moved, x, t)
  assert how == "mirrored_shifted"
  np.testing.assert_array_equal(got[moved[..., 0] > 0], np.roll(x[:, ::-1], (2, -3), (0, 1))[
      moved[..., 0] > 0])
  # A mask another shape than the source's: no move reproduces it.
  grown = moved.copy()
  grown[0, 0] = 1
  assert quality_report.placed_source(grown, x, t) == (None, "tumor_moved")
  # A symmetric mask whose image is not: mirrored or not cannot be told apart.
  sym = np.zeros((16, 16, 1), np.float32)
  sym[4:8, 6:10] = 1
  assert quality_report.placed_source(np.roll(sym, 1, axis=1), x, sym) == (None, "ambiguous")


def test_vgg_features_by_default(sets, tmp_path):
  real, synthetic, _ = sets
  config = tiny.get_config()
  assert quality_report.feature_backend(config) == config.synthesis.backend
  config.synthesis.backend = "pixels"  # not a network: realism uses VGG16 anyway.
  result = quality_report.run(config, str(tmp_path), real,
                              {"real_copy": synthetic["real_copy"]}, salt=SALT,
                              max_slices=2)  # VGG16 runs at 224 x 224: few slices.
  copy = result["sets"]["real_copy"][CENTER]
  assert result["settings"]["features"] == "vgg16_imagenet/mean"
  assert copy["n_features"] == result["reference"][CENTER]["n_features"] == 2
  assert np.isfinite([copy["frechet"], copy["frechet_ring"]]).all() and copy["diversity"] > 0
  assert result["settings"]["r_out"] == 1  # 6 px at 240 -> 1 px at 32


# --- KID and the real-vs-real noise floor ---------------------------------


def test_kid_and_the_real_vs_real_row_are_in_the_table(measured):
  _, _, result = measured
  fl = result["floor"][CENTER]
  assert "reason" not in fl and fl["splits"] == quality_report.REAL_SPLITS
  assert result["settings"]["real_splits"] == quality_report.REAL_SPLITS
  copy, cut = result["sets"]["real_copy"][CENTER], result["sets"]["cutpaste"][CENTER]
  # Unbiased: the real slices against themselves are not at 0 but below it
  # (a slice's kernel with itself is left out on one side only: the estimate
  # is -2 (mean k(x, x) - mean k(x, y)) / n), and never above a set that
  # differs from them.
  assert copy["kid"] < 0 and copy["kid"] <= cut["kid"] and copy["kid_std"] >= 0
  # The copy, drawn from the other half's patients, is one more real half.
  assert fl["sets"]["real_copy"]["by_source"]
  assert quality_report.set_verdict(fl["sets"]["real_copy"]["above_real"]) == "within"
  text = quality_report.table(result)
  assert "| real vs real (halves of the patients) | CBICA |" in text
  assert "| Frechet | KID | Frechet (ring) |" in text
  assert "| real: one half of the patients | CBICA |" in text
  # The phantom's CBICA_train has 2 patients: one split and its mirror image,
  # no evidence for a verdict either way.
  assert fl["patients"] == 2 and fl["distinct_splits"] == 2
  assert "only 2 distinct halves" in text
  assert quality_report.WITHIN not in text and "no ranking" not in text
  # No verdict line; a cutpaste line only to say which tumors were left out.
  assert not [l for l in text.splitlines() if l.startswith("- dfgm vs")]
  assert all("ambiguous" in l for l in text.splitlines() if l.startswith("- cutpaste ("))


def _floor_record(rng, sets, n_splits=20):
  """A quality.json with only the noise floor: real patients with a patient
  effect, and sets made by the same recipe (optionally shifted)."""
  from tests.test_quality import clustered  # pylint: disable=g-import-not-at-top
  real, groups = clustered(rng, 16, 8, d=12)
  feats = {}
  for name, shift in sets.items():
    f, _ = clustered(rng, 16, 8, d=12, shift=shift)
    feats[name] = (f, groups)  # each synthetic slice's source patient
  fl = quality_report.floor_numbers(real, groups, feats, n_splits)
  return {"settings": {"real_splits": n_splits}, "sets": {}, "floor": {CENTER: fl}}


def test_a_set_like_real_is_within_the_noise_and_a_shifted_one_above():
  record = _floor_record(np.random.default_rng(11), {"like_real": 0.0, "shifted": 0.6})
  fl = record["floor"][CENTER]
  assert quality_report.set_verdict(fl["sets"]["like_real"]["above_real"]) == "within"
  assert quality_report.set_verdict(fl["sets"]["shifted"]["above_real"]) == "above"
  text = quality_report.table(record)
  like = next(l for l in text.splitlines() if l.startswith(f"- like_real ({CENTER})"))
  shifted = next(l for l in text.splitlines() if l.startswith(f"- shifted ({CENTER})"))
  assert quality_report.WITHIN in like and "above the real-vs-real range" in shifted
  pair = next(l for l in text.splitlines() if l.startswith("- like_real vs shifted"))
  assert "like_real ranks ahead of shifted: closer to real in 100%" in pair


def test_no_ranking_between_two_sets_of_the_same_distribution():
  record = _floor_record(np.random.default_rng(12), {"one": 0.0, "two": 0.0})
  (pair,) = record["floor"][CENTER]["ahead"]
  assert quality_report.pair_verdict(pair) is None
  text = quality_report.table(record)
  line = next(l for l in text.splitlines() if l.startswith("- one vs two"))
  assert line.endswith("no ranking.") and "ranks ahead" not in text


def test_verdict_rules_at_the_confidence_level():
  assert quality_report.set_verdict({"frechet": 0.9, "kid": 0.95}) == "above"
  assert quality_report.set_verdict({"frechet": 0.85, "kid": 0.6}) == "within"
  assert quality_report.set_verdict({"frechet": 1.0, "kid": 0.5}) == "disagree"
  pair = {"set": "a", "other": "b", "frechet": 0.6, "kid": 0.6,
          "other_closer": {"frechet": 0.4, "kid": 0.4}}
  assert quality_report.pair_verdict(pair) is None  # the 60 %: no ranking
  assert quality_report.pair_verdict({**pair, "frechet": 0.95, "kid": 0.9}) == "a"
  assert quality_report.pair_verdict({**pair, "frechet": 0.0, "kid": 0.05, "other_closer": {
      "frechet": 1.0, "kid": 0.95}}) == "b"


def test_a_record_without_a_floor_says_so_and_settings_come_from_the_config():
  old = {"settings": {"features": "f", "r_out": 1, "max_slices": 0}, "reference": {},
         "sets": {"dfgm": {CENTER: {"n": 3, "n_features": 3, "frechet": 1.0,
                                    "preservation_left_out": {}}}}}
  text = quality_report.table(old)
  assert "No real-vs-real noise floor was measured" in text and "| dfgm |" in text
  config = tiny.get_config()
  assert quality_report.floor_settings(config) == {
      "kid_subsets": config.evaluation.quality_kid_subsets,
      "kid_subset_size": config.evaluation.quality_kid_subset_size,
      "real_splits": config.evaluation.quality_real_splits}
  config.evaluation.quality_real_splits = 3
  assert quality_report.floor_settings(config)["real_splits"] == 3
  del config["evaluation"]
  assert quality_report.floor_settings(config) == {
      "kid_subsets": quality_report.KID_SUBSETS,
      "kid_subset_size": quality_report.KID_SUBSET_SIZE,
      "real_splits": quality_report.REAL_SPLITS}
