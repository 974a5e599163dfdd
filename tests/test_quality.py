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


# --- KID and the real-vs-real noise floor ---------------------------------


def brute_mmd2(x, y):
  """The unbiased MMD^2 with KID's kernel, pair by pair."""
  d = x.shape[1]
  k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3
  m, n = len(x), len(y)
  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return sxx + syy - 2 * sxy


def test_kid_matches_brute_force():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(9, 4)), rng.normal(0.3, 1.2, size=(7, 4))
  # All slices in one subset: the full-set estimate, whatever the draw's order.
  full = quality.kernel_inception_distance(a[:7], b, n_subsets=3, subset_size=50)
  assert full["subset_size"] == 7 and full["std"] == pytest.approx(0.0, abs=1e-12)
  assert full["mean"] == pytest.approx(brute_mmd2(a[:7], b), rel=1e-12)
  # Subsets of 5, drawn as documented: a's rows, then b's, per subset.
  kid = quality.kernel_inception_distance(a, b, n_subsets=4, subset_size=5, seed=3)
  draw = np.random.default_rng(3)
  values = []
  for _ in range(4):
    ia, ib = draw.choice(9, 5, replace=False), draw.choice(7, 5, replace=False)
    values.append(brute_mmd2(a[ia], b[ib]))
  assert kid["mean"] == pytest.approx(np.mean(values), rel=1e-12)
  assert kid["std"] == pytest.approx(np.std(values), rel=1e-9)
  # Unequal sizes through mmd2_unbiased.
  kxx = quality.polynomial_kernel(a, a)
  kyy, kxy = quality.polynomial_kernel(b, b), quality.polynomial_kernel(a, b)
  assert quality.mmd2_unbiased(kxx, kyy, kxy) == pytest.approx(brute_mmd2(a, b), rel=1e-12)
  with pytest.raises(ValueError, match="at least 2"):
    quality.kernel_inception_distance(a, b, subset_size=1)


def test_kid_is_unbiased_at_small_n_and_grows_with_a_shift():
  rng = np.random.default_rng(6)
  d = 8
  same, shifted = [], []
  for _ in range(200):
    x, y = rng.normal(size=(10, d)), rng.normal(size=(10, d))
    same.append(quality.mmd2_unbiased(quality.polynomial_kernel(x, x),
                                      quality.polynomial_kernel(y, y),
                                      quality.polynomial_kernel(x, y)))
    z = y + 0.7
    shifted.append(quality.mmd2_unbiased(quality.polynomial_kernel(x, x),
                                         quality.polynomial_kernel(z, z),
                                         quality.polynomial_kernel(x, z)))
  same, shifted = np.asarray(same), np.asarray(shifted)
  # 0 in expectation at n = 10 (within 4 standard errors), often negative.
  assert abs(same.mean()) < 4 * same.std() / np.sqrt(len(same))
  assert (same < 0).mean() > 0.2
  assert shifted.mean() > same.mean() + 4 * shifted.std() / np.sqrt(len(shifted))
  # The Frechet distance of the same samples is biased upwards at small n.
  fd = [quality.frechet_distance(rng.normal(size=(10, d)), rng.normal(size=(10, d)))
        for _ in range(20)]
  assert min(fd) > 0


def clustered(rng, n_patients, per, d=6, shift=0.0, prefix="p"):
  """Features with a patient effect: slices of one patient are alike."""
  f, g = [], []
  for p in range(n_patients):
    f.append(rng.normal(0, 0.5, d) + rng.normal(size=(per, d)) + shift)
    g += [f"{prefix}{p}"] * per
  return np.concatenate(f), np.asarray(g)


def test_patient_halves_split_patients_not_slices():
  rng = np.random.default_rng(7)
  _, groups = clustered(rng, 5, 3)
  a, b = quality.patient_halves(groups, rng)
  assert not set(groups[a]) & set(groups[b])
  assert len(set(groups[a])) == 2 and len(set(groups[b])) == 3
  assert sorted(np.concatenate([a, b])) == list(range(15))
  with pytest.raises(ValueError, match="2 patients"):
    quality.patient_halves(["p0"] * 4, rng)


def test_noise_floor_compares_at_equal_n_without_the_reference_patients():
  rng = np.random.default_rng(8)
  real, groups = clustered(rng, 12, 6)
  # A copy of the real slices: drawn from half A only, it is one more real half.
  # Unsourced, the same copy may hold the reference half's own slices.
  out = quality.noise_floor(real, groups, {"copy": (real, groups), "unsourced": (real, None)},
                            n_splits=10, seed=1)
  assert out["n_splits"] == 10 and out["n"] == [36] * 10 and out["n_reference"] == [36] * 10
  assert out["sets"]["copy"]["by_source"] and not out["sets"]["unsourced"]["by_source"]
  below = quality.fraction_below(out["sets"]["unsourced"]["frechet"], out["real"]["frechet"])
  assert below == 1.0  # sharing slices with the reference favours a set
  # Here m = |A|: the copy's eligible slices are exactly half A, as real's.
  np.testing.assert_allclose(out["sets"]["copy"]["frechet"], out["real"]["frechet"], rtol=1e-9)
  np.testing.assert_allclose(out["sets"]["copy"]["kid"], out["real"]["kid"], rtol=1e-9)
  # A set with fewer eligible slices (its sources: 3 of the 12 patients) sets
  # every row's n: the slices of its patients that fall in A.
  few = (real[:18], groups[:18])
  out = quality.noise_floor(real, groups, {"few": few}, n_splits=8, seed=1)
  assert 0 < out["n_splits"] <= 8 and max(out["n"]) <= 18
  assert all(n % 6 == 0 for n in out["n"])  # whole patients of A
  assert len(out["sets"]["few"]["frechet"]) == len(out["real"]["kid"]) == out["n_splits"]


def test_spread_and_fraction_below():
  s = quality.spread([1.0, 2.0, 3.0, None])
  assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
  assert quality.spread([]) is None
  assert quality.fraction_below([1, 2, 3, 4], [2, 2, 2, 2]) == 0.25  # ties are not below
  assert quality.fraction_below([], []) is None
