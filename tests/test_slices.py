"""Slice selection, resampling and patient splits (data_pipeline/slices.py)."""

import numpy as np
import pytest

from data_pipeline import slices


def test_tumor_slices_on_stride_grid_with_window_around_peak():
  area = np.zeros(100)
  area[20:71] = 200
  area[45] = 900  # the largest cross-section.
  area[25] = 10   # too small.
  zs = slices.select_tumor_slices(area, stride=5, max_per_volume=5, min_area=50)
  assert zs == [35, 40, 45, 50, 55]
  assert slices.select_tumor_slices(area, 5, 0, 50) == [20] + list(range(30, 71, 5))


def test_healthy_slices_rules():
  n = 60
  tumor = np.zeros(n)
  tumor[30:34] = 10
  brain = np.full(n, 1000.0)
  brain[:10] = 10  # caps with little brain.
  zs = slices.select_healthy_slices(tumor, brain, stride=5, min_gap=3,
                                    min_brain_pixels=500, max_per_volume=0)
  assert zs == [10, 15, 20, 25, 40, 45, 50, 55]  # 35 is 2 slices from 33.
  few = slices.select_healthy_slices(tumor, brain, 5, 3, 500, max_per_volume=3)
  assert few == [10, 40, 55]


def test_resample_matrix_preserves_constants_and_averages():
  r = slices.resample_matrix(240, 128)
  np.testing.assert_allclose(r.sum(1), 1.0, rtol=1e-6)
  img = np.full((240, 240), -1.0, np.float32)
  out = slices.to_output_grid(img, 128, "resize", fill=-1.0)
  np.testing.assert_allclose(out, -1.0, atol=1e-6)
  # 2x downsampling of a checkerboard averages to its mean (antialiasing).
  board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
  # (Edge pixels see a truncated kernel, hence the interior.)
  down = slices.to_output_grid(board, 32, "resize", 0.0)
  np.testing.assert_allclose(down[1:-1, 1:-1], 0.5, atol=1e-6)


def test_pad_is_lossless_and_centered():
  img = np.random.default_rng(0).normal(size=(240, 240)).astype(np.float32)
  out = slices.to_output_grid(img, 256, "pad", fill=-1.0)
  assert out.shape == (256, 256)
  np.testing.assert_array_equal(out[8:-8, 8:-8], img)
  assert np.all(out[:8] == -1.0)
  with pytest.raises(ValueError, match="cannot pad"):
    slices.to_output_grid(img, 128, "pad", fill=-1.0)


def test_labels_resample_consistently_with_mask():
  labels = np.zeros((240, 240), np.uint8)
  labels[100:140, 100:140] = 2
  labels[110:130, 110:130] = 3
  out = slices.labels_to_output_grid(labels, 128, "resize")
  assert set(np.unique(out)) == {0, 2, 3}
  frac = np.count_nonzero(out) / 128**2
  assert abs(frac - 1600 / 240**2) < 0.002


@pytest.mark.parametrize("n,n_train,n_test", [(129, 103, 26), (167, 134, 33),
                                               (1, 1, 0), (3, 2, 1)])
def test_split_counts_follow_the_paper(n, n_train, n_test):
  ids = [f"case{i:03d}" for i in range(n)]
  train, test = slices.split_patients(ids, 0.2, seed=0, center="CBICA")
  assert (len(train), len(test)) == (n_train, n_test)
  assert not set(train) & set(test)
  assert sorted(train + test) == ids


def test_split_is_seeded():
  ids = [f"c{i}" for i in range(50)]
  a = slices.split_patients(ids, 0.2, 0, "TCIA")
  assert a == slices.split_patients(list(reversed(ids)), 0.2, 0, "TCIA")
  assert a != slices.split_patients(ids, 0.2, 1, "TCIA")
  assert a != slices.split_patients(ids, 0.2, 0, "CBICA")


@pytest.mark.parametrize("n", [1, 2, 3, 6, 129])
def test_split_shortfall_names_an_empty_split_and_the_fractions_that_avoid_it(n):
  ids = [f"p{i:03d}" for i in range(n)]
  for fraction in np.arange(0.0, 1.0, 0.05):
    train, test = slices.split_patients(ids, fraction, seed=0, center="CBICA")
    message = slices.split_shortfall("CBICA", n, fraction)
    assert (message is None) == bool(train and test), (n, fraction)
    if message:
      empty = "CBICA_test" if not test else "CBICA_train"
      assert message.startswith(f"center CBICA: {n} patient") and f"{empty} empty" in message
  if n >= 2:  # the range it names is exactly where both splits get a patient.
    low, high = 0.5 / n, (n - 0.5) / n
    assert f"test_fraction in [{low:.3g}, {high:.3g})" in slices.split_shortfall("CBICA", n, 0.0)
    for fraction, ok in ((low, True), (high - 1e-9, True), (low - 1e-9, False), (high, False)):
      assert (slices.split_shortfall("CBICA", n, fraction) is None) == ok, (n, fraction)
  else:
    assert "cannot be both" in slices.split_shortfall("CBICA", 1, 0.2)
