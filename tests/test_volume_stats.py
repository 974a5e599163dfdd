"""Tests of data_pipeline/volume_stats.py and launch/phantom_stats.py."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, make_case, require_shared
from data_pipeline import volume_stats


def _block_case(healthy=100.0, ed=150.0, et=230.0, ncr=40.0):
  """A 24^3 volume: brain = [2, 22)^3, a 4^3 tumor (ED, ET, NCR slabs)."""
  shape = (24, 24, 24)
  brain = np.zeros(shape, bool)
  brain[2:22, 2:22, 2:22] = True
  labels = np.zeros(shape, np.uint8)
  labels[4:8, 10:14, 10:14] = 2
  labels[4:8, 10:14, 12] = 3
  labels[4:8, 10:14, 13] = 1
  image = np.where(brain, healthy, 0.0).astype(np.float32)
  image[labels == 2], image[labels == 3], image[labels == 1] = ed, et, ncr
  return brain, labels, image


def test_known_tumor_gives_its_ratios_size_and_position():
  brain, labels, image = _block_case()
  stats = volume_stats.case_stats({"t2": image, "flair": 2 * image}, labels)
  for modality in ("t2", "flair"):
    assert stats[f"{modality}.ratio.ed"] == pytest.approx(1.5)
    assert stats[f"{modality}.ratio.et"] == pytest.approx(2.3)
    assert stats[f"{modality}.ratio.ncr"] == pytest.approx(0.4)
    # WT: 32 ED, 16 ET, 16 NCR voxels: the median is ED's.
    assert stats[f"{modality}.ratio.wt"] == pytest.approx(1.5)
  assert stats["size.wt_voxels"] == 64
  assert stats["size.wt_fraction"] == pytest.approx(64 / 20**3)
  assert stats["size.ed_share"] == pytest.approx(0.5)
  assert stats["size.et_share"] == stats["size.ncr_share"] == pytest.approx(0.25)
  # Centroid (5.5, 11.5, 11.5) in a brain box spanning 2..21.
  assert stats["position.x"] == pytest.approx(3.5 / 19)
  assert stats["position.y"] == stats["position.z"] == pytest.approx(9.5 / 19)
  # Centroid x 5.5 rounds up to 6; the nearest non-brain voxel is x = 1.
  assert stats["position.depth_mm"] == pytest.approx(5.0)
  # x = 4, 5, 6 lie within 5 mm of the border, x = 7 does not.
  assert stats["position.border_share"] == pytest.approx(0.75)
  # Anisotropic voxels stretch the distance.
  wide = volume_stats.case_stats({"t2": image}, labels, zooms=(2.0, 1.0, 1.0))
  assert wide["position.depth_mm"] == pytest.approx(10.0)


def test_ratios_ignore_the_tumors_own_spread_and_outliers():
  # Medians: a few extreme voxels move neither the healthy reference nor a
  # region's value.
  brain, labels, image = _block_case()
  image[3, 3, 3:8] = 30000.0
  stats = volume_stats.case_stats({"t1": image}, labels)
  assert stats["t1.ratio.ed"] == pytest.approx(1.5)


def test_histogram_after_normalisation():
  # A brain of uniformly spread values: the normalised quantiles are those
  # of volumes.normalise (0.5-99.5 % mapped to [-1, 1]).
  brain, labels, _ = _block_case()
  rng = np.random.default_rng(0)
  image = np.where(brain, rng.uniform(100, 200, brain.shape), 0).astype(np.float32)
  stats = volume_stats.case_stats({"t1": image}, labels)
  for q in volume_stats.QUANTILES:
    want = 2 * (q / 100 - 0.005) / 0.99 - 1
    assert stats[f"t1.q{q:02d}"] == pytest.approx(want, abs=0.02)


def test_texture_is_local_spread_over_tissue_spread():
  brain, labels, _ = _block_case()
  # Smooth two-tissue brain: half at 100, half at 200 (IQR 100), no noise.
  x = np.arange(24)[:, None, None]
  smooth = np.where(brain, np.where(x < 12, 100.0, 200.0), 0).astype(np.float32)
  smooth = np.broadcast_to(smooth, brain.shape).copy()
  rng = np.random.default_rng(1)
  noisy = smooth + np.where(brain, rng.normal(0, 10, brain.shape), 0).astype(np.float32)
  t_smooth = volume_stats.case_stats({"t1": smooth}, labels)["t1.texture"]
  t_noisy = volume_stats.case_stats({"t1": noisy}, labels)["t1.texture"]
  # Only the windows on the tissue edge (2 of 18 columns, local std about
  # 47) vary in the smooth brain; noise of sigma 10 adds about 10 / 100 to
  # every window.
  assert t_smooth == pytest.approx(2 / 18 * np.sqrt(2 / 9) * 100 / 100, rel=0.05)
  assert 0.08 < t_noisy - t_smooth < 0.13
  # Scaling the intensities leaves it unchanged.
  scaled = volume_stats.case_stats({"t1": 3 * noisy}, labels)["t1.texture"]
  assert scaled == pytest.approx(t_noisy, rel=1e-4)


def test_case_without_tumor_is_refused():
  brain, labels, image = _block_case()
  with pytest.raises(ValueError, match="needs a tumor"):
    volume_stats.case_stats({"t1": image}, np.zeros_like(labels))


def test_summarise_and_compare():
  rows = [{"a": 1.0, "b": 10.0}, {"a": 2.0}, {"a": 4.0, "b": float("nan")}]
  summary = volume_stats.summarise(rows)
  assert summary["a"]["median"] == 2.0 and summary["a"]["n"] == 3
  assert summary["a"]["q25"] == 1.5 and summary["a"]["q75"] == 3.0
  assert (summary["a"]["min"], summary["a"]["max"]) == (1.0, 4.0)
  assert summary["b"]["n"] == 1  # the NaN is left out.
  candidate = volume_stats.summarise([{"a": 5.0, "b": 10.0}])
  out = volume_stats.compare(candidate, summary)
  assert not out["a"]["inside"] and out["a"]["distance"] == pytest.approx(1.0)
  assert out["b"]["inside"] and out["b"]["distance"] == 0.0
  slack = volume_stats.compare(candidate, summary, tolerance={"a": 1.0})
  assert slack["a"]["inside"]


def _binary(*args):
  return subprocess.run([sys.executable, "-m", "launch.phantom_stats", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_binary_measures_and_compares_folders(tmp_path):
  for number in (1, 2):
    make_case(str(tmp_path / "a"), "2018", number, site="TCIA01")
  make_case(str(tmp_path / "b"), "2018", 3, site="CBICA")
  out = tmp_path / "a.json"
  done = _binary(f"--brats_dir={tmp_path / 'a'}", f"--reference={tmp_path / 'b'}",
                 f"--out={out}")
  assert done.returncode == 0, done.stderr
  result = json.loads(out.read_text())
  assert len(result["cases"]) == 2
  assert {row["center"] for row in result["cases"].values()} == {"TCIA"}
  assert result["summary"]["size.wt_voxels"]["n"] == 2
  assert result["comparison"]["t2.ratio.ed"]["min"] == (
      result["reference"]["summary"]["t2.ratio.ed"]["min"])
  assert "| t2.ratio.ed |" in done.stdout
  # A JSON it wrote serves as the reference too.
  again = _binary(f"--brats_dir={tmp_path / 'b'}", f"--reference={out}")
  assert again.returncode == 0, again.stderr
  bad = _binary(f"--brats_dir={tmp_path / 'a'}", f"--phantom_cases=2")
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: give exactly one of --brats_dir and --phantom_cases")


REAL_18 = f"{SHARED_DATA}/brats18_real"
# Phantom cases measured: the first four picks cover a medium HGG, the large
# border tumor, an LGG and the small tumor (phantom._tumor_kind).
PHANTOM_CASES = 4


@pytest.mark.slow
@pytest.mark.ci_slow
def test_phantom_statistics_lie_within_the_real_cases(tmp_path):
  """Every statistic's phantom median (4 cases, the demo's settings) lies in
  the range of the eleven real BraTS 2018 cases."""
  real_dir = require_shared(REAL_18, "the eleven real BraTS 2018 cases the "
                            "phantom is calibrated on")
  from data_pipeline import phantom
  real = volume_stats.summarise(volume_stats.numeric_rows(
      volume_stats.measure_folder(real_dir)))
  info = phantom.generate(str(tmp_path), version="2020", num_cases=PHANTOM_CASES,
                          seed=0, num_workers=2)
  ours = volume_stats.summarise(volume_stats.numeric_rows(
      volume_stats.measure_folder(info.data_dir)))
  comparison = volume_stats.compare(ours, real)
  assert len(comparison) == len(real)  # every statistic is compared.
  outside = {name: c for name, c in comparison.items() if not c["inside"]}
  assert not outside, outside
