"""Synthesis-quality numbers: Frechet distance, diversity, seam, preservation."""

import numpy as np
import pytest
import scipy.linalg
from scipy import ndimage

from dfgm_jax.eval import quality

S = 32


def whitened(rng, n, d):
  """n samples with sample mean exactly 0 and sample covariance exactly I."""
  x = rng.normal(size=(n, d))
  x -= x.mean(axis=0)
  cov = np.cov(x, rowvar=False)
  return x @ np.linalg.inv(np.linalg.cholesky(cov)).T


def test_frechet_identical_sets_is_zero():
  f = np.random.default_rng(0).normal(size=(60, 12))
  assert abs(quality.frechet_distance(f, f)) < 1e-9
  # Row order does not matter.
  assert abs(quality.frechet_distance(f, f[::-1])) < 1e-9


def test_frechet_shifted_gaussians_closed_form():
  rng = np.random.default_rng(1)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  a = whitened(rng, 200, d) * np.sqrt(s1) + mu1  # covariance exactly diag(s1)
  b = whitened(rng, 150, d) * np.sqrt(s2) + mu2
  # Diagonal covariances commute: tr(s1 + s2 - 2 sqrt(s1 s2)) = sum (sqrt s1 - sqrt s2)^2.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
  # Equal covariances, shifted means: just ||mu1 - mu2||^2.
  c = whitened(rng, 200, d) * np.sqrt(s1) + mu2
  assert quality.frechet_distance(a, c) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-10)


def test_frechet_full_covariances_match_scipy_sqrtm():
  rng = np.random.default_rng(2)
  d = 5
  l1, l2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  c1, c2 = l1 @ l1.T, l2 @ l2.T  # do not commute
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  ref = (np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
         - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real))
  assert quality.gaussian_frechet(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-9)
  # One dimension: (m1 - m2)^2 + (sigma1 - sigma2)^2.
  assert quality.gaussian_frechet([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_frechet_rank_deficient_stays_real():
  # Fewer samples than features, as with few tumor slices and 512 features.
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(10, 40)), rng.normal(0.5, 1.0, size=(12, 40))
  fd = quality.frechet_distance(a, b)
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  ref = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
         - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real))
  assert isinstance(fd, float) and fd > 0
  assert fd == pytest.approx(ref, rel=1e-6)
  # The same through the D x D covariances (the path for many samples).
  assert fd == pytest.approx(quality.gaussian_frechet(a.mean(0), ca, b.mean(0), cb), rel=1e-6)
  # Identical rank-deficient sets: 0 to rounding, not sqrt(rounding).
  assert abs(quality.frechet_distance(a, a)) < 1e-12 * np.trace(ca)
  with pytest.raises(ValueError, match="feature sizes"):
    quality.frechet_distance(a, b[:, :30])


def test_diversity():
  # Pairwise distances 5, 8, 5 -> mean 6.
  pts = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])
  assert quality.diversity(pts) == pytest.approx(6.0)
  assert quality.diversity(np.ones((4, 3, 2))) == 0.0  # copies; (N, D...) is flattened
  with pytest.raises(ValueError, match="at least 2"):
    quality.diversity(pts[:1])


def square_mask(n=1):
  m = np.zeros((n, S, S, 1), np.float32)
  m[:, 8:24, 8:24] = 1.0
  return m


def test_boundary_gradient_of_a_step_by_hand():
  # A 16x16 square of value c on 0, away from the image edge. The band holds
  # the square's inner border (60 px) and the 4-connected outer ring (64 px).
  # Central differences give c/2 across the edge at every band pixel, and
  # (c/2, c/2) -> c/sqrt(2) at the 4 inner corners:
  # mean = (120 * c/2 + 4 * c/sqrt(2)) / 124.
  m = square_mask()
  band = quality.boundary_band(m)
  assert band.sum() == 124
  for c in (1.0, 0.4):
    g = quality.boundary_gradient(m * c, m)
    np.testing.assert_allclose(g, [(60 * c + 4 * c / np.sqrt(2)) / 124])
  # An empty mask has no boundary.
  assert np.isnan(quality.boundary_gradient(np.zeros((1, S, S, 1)), np.zeros((1, S, S, 1)))[0])


def composites():
  """Real tumor slices (soft edges), a hard cut-paste and a smoothed one."""
  rng = np.random.default_rng(4)
  m = square_mask(3)
  soft = ndimage.gaussian_filter(m, sigma=(0, 1.5, 1.5, 0))
  source = -0.2 + 0.7 * soft + 0.02 * rng.normal(size=m.shape)    # real tumor slices
  healthy = -0.5 + 0.02 * rng.normal(size=m.shape)               # healthy matches
  hard = m * source + (1 - m) * healthy                           # cut-paste
  smooth = soft * source + (1 - soft) * healthy                   # blended seam
  return m, source, healthy, hard, smooth


def test_seam_score_hard_edge_above_smooth():
  m, source, _, hard, smooth = composites()
  hard_score = quality.seam_score(hard, m, source, m)
  smooth_score = quality.seam_score(smooth, m, source, m)
  assert hard_score > smooth_score
  assert hard_score > 1.0
  assert quality.seam_score(source, m, source, m) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="empty"):
    quality.seam_score(hard, np.zeros_like(m), source, m)


def test_tumor_preservation():
  m, source, healthy, hard, smooth = composites()
  np.testing.assert_array_equal(quality.tumor_preservation(hard, source, m), 0.0)
  # Changing only the outside (a regenerated ring) keeps the tumor.
  ring_changed = hard + (1 - m) * 0.3
  np.testing.assert_array_equal(quality.tumor_preservation(ring_changed, source, m), 0.0)
  # A shift of 0.1 inside M is an error of 0.1.
  np.testing.assert_allclose(quality.tumor_preservation(hard + 0.1 * m, source, m), 0.1)
  assert np.all(quality.tumor_preservation(smooth, source, m) > 0)  # the blend eats the edge


def test_ring_images():
  m = np.zeros((1, S, S, 1), np.float32)
  m[0, 16, 16] = 1.0
  img = np.full((1, S, S, 1), 0.25, np.float32)
  ring = quality.ring_images(img, m, r_out=2)
  # Disk of radius 2 around one pixel: 13 pixels, minus the tumor pixel.
  assert (ring == 0.25).sum() == 12
  assert ring[0, 16, 16, 0] == -1.0 and ring[0, 14, 16, 0] == 0.25
  # Default radius: round(6 * 32 / 240) = 1 -> the 4 cross neighbours.
  assert (quality.ring_images(img, m) == 0.25).sum() == 4


def pool8(images):
  """A cheap feature map for tests: 4x4 area means of an (N, 32, 32, 1) set (64-D)."""
  x = np.asarray(images, np.float64)
  return x.reshape(len(x), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(x), -1)


def test_feature_fn_shapes():
  _, _, _, hard, _ = composites()
  # The bank's 'pixels' backend: a 32x32 grid, flattened or averaged over space.
  assert quality.FeatureFn("pixels", pool="flatten")(hard).shape == (3, 32 * 32)
  means = quality.FeatureFn("pixels")(hard)
  np.testing.assert_allclose(means[:, 0], hard.mean(axis=(1, 2, 3)), atol=1e-6)
  with pytest.raises(ValueError, match="pool"):
    quality.FeatureFn("pixels", pool="max")


def test_set_quality():
  m, source, _, hard, _ = composites()
  out = quality.set_quality(hard, m, source, m, sources=source, feature_fn=pool8)
  assert out["preservation_mae"] == 0.0
  assert out["seam_score"] == pytest.approx(
      out["boundary_gradient"] / out["real_boundary_gradient"])
  assert out["frechet"] > 0 and out["frechet_ring"] > 0
  assert (out["n"], out["n_real"]) == (3, 3)
  same = quality.set_quality(source, m, source, m, feature_fn=pool8)
  assert abs(same["frechet"]) < 1e-12 and abs(same["frechet_ring"]) < 1e-12
  assert same["seam_score"] == pytest.approx(1.0)
  assert "preservation_mae" not in same
  assert same["diversity"] == pytest.approx(same["real_diversity"])
