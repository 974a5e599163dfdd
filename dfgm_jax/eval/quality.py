"""Synthesis quality in numbers: seam, tumor preservation, realism, diversity.

The paper shows quality only as pictures (its Figure 2: cut-paste leaves a
serrated boundary, AnomalyDiffusion loses the tumor shape). These functions put
numbers on a synthetic set (issue 12). Images are numpy (N, S, S, C) in
[-1, 1], masks (N, S, S, 1) (or (N, S, S)) in {0, 1}.

- Seam: the image gradient on the tumor boundary band, against the same
  statistic at real tumor boundaries (`seam_score`, 1 = as sharp as real
  tumors; a hard cut-paste edge scores above a smoothed one).
- Tumor preservation: mean absolute error inside M against the source tumor
  slice (`tumor_preservation`; 0 for an exact paste, which dfgm keeps).
- Realism: Frechet distance between feature sets (`frechet_distance`, float64:
  float32 was off by 0.1 at d = 512, n = 300, ECOSYSTEM.md 10), of synthetic
  against real tumor slices and of their rings (`ring_images`).
- Diversity: mean pairwise L2 distance between the features of a set
  (`diversity`).

Features come from the memory bank's VGG16 trunk (`FeatureFn`, which calls
`synthesis.matching.feature_extractor`), spatially averaged to 512 numbers per
image as FID averages Inception's last map. `set_quality` gathers the numbers
of one synthetic set.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

_CROSS = ndimage.generate_binary_structure(2, 1)


def _images(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 4:
    raise ValueError(f"{name}: expected images (N, S, S, C), got shape {x.shape}")
  return x


def _masks(m, n: int, name: str) -> np.ndarray:
  m = np.asarray(m)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  if m.ndim != 3 or m.shape[0] != n:
    raise ValueError(f"{name}: expected {n} masks (N, S, S[, 1]), got shape {m.shape}")
  return m > 0.5


def boundary_band(masks) -> np.ndarray:
  """The 1-px boundary band of M on both sides of its edge: (N, S, S) bool.

  band = dilate(M) and not erode(M), both by the 4-connected cross: the last
  pixel row inside the tumor and the first one outside, so every pixel pair
  across the edge lies in the band.
  """
  m = _masks(masks, np.shape(masks)[0], "masks")
  out = np.zeros_like(m)
  for i, mi in enumerate(m):
    out[i] = (ndimage.binary_dilation(mi, _CROSS)
              & ~ndimage.binary_erosion(mi, _CROSS, border_value=0))
  return out


def gradient_magnitude(images) -> np.ndarray:
  """|grad I| per pixel, (N, S, S): central differences (one-sided at the image
  edge) in intensity units per pixel, root of the sum of squares over the two
  axes, averaged over channels."""
  x = _images(images, "images")
  gy, gx = np.gradient(x, axis=(1, 2))
  return np.sqrt(gy * gy + gx * gx).mean(axis=-1)


def boundary_gradient(images, masks) -> np.ndarray:
  """Mean gradient magnitude on each image's boundary band of M: (N,) float64.

  NaN for an empty mask (no boundary).
  """
  grad = gradient_magnitude(images)
  band = boundary_band(_masks(masks, grad.shape[0], "masks"))
  total = (grad * band).sum(axis=(1, 2))
  count = band.sum(axis=(1, 2))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def seam_score(images, masks, real_images, real_masks) -> float:
  """How sharp the pasted tumor's boundary is, relative to real tumor boundaries.

  seam = mean_i g(y_i, M_i) / mean_j g(x_j, M_j), where g(I, M) is the mean
  gradient magnitude |grad I| (`gradient_magnitude`) on the 1-px boundary band
  of M (`boundary_band`: the pixels just inside and just outside the edge),
  y_i are the synthetic slices with their labels M_i and x_j real tumor slices
  with their own masks. Slices with empty masks are left out.

  1 means the seam is as sharp as a real tumor's boundary; above 1 a visible
  edge (cut-paste), below 1 a boundary smoothed more than real ones.
  """
  synth = boundary_gradient(images, masks)
  real = boundary_gradient(real_images, real_masks)
  if np.all(np.isnan(synth)) or np.all(np.isnan(real)):
    raise ValueError("seam_score: every mask is empty on one side")
  return float(np.nanmean(synth) / np.nanmean(real))


def tumor_preservation(images, sources, masks) -> np.ndarray:
  """Mean absolute error inside M between each synthetic slice and its source
  tumor slice (the private slice the tumor was cut from): (N,) float64, in
  [-1, 1] intensity units; NaN for an empty mask. 0 for an exact paste."""
  y, x = _images(images, "images"), _images(sources, "sources")
  if y.shape != x.shape:
    raise ValueError(f"images {y.shape} and sources {x.shape} differ in shape")
  m = _masks(masks, y.shape[0], "masks")
  err = np.abs(y - x).mean(axis=-1)
  count = m.sum(axis=(1, 2))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, (err * m).sum(axis=(1, 2)) / np.maximum(count, 1), np.nan)


def ring_images(images, masks, r_out: int | None = None) -> np.ndarray:
  """Images with everything outside the boundary ring set to background (-1).

  The ring is the synthesizer's m = dilate(M, r_out) minus M
  (`synthesis.masks.ring`), r_out = round(6 * S / 240) by default (ALGORITHM.md
  3): the region dfgm regenerates, so its realism can be measured apart from
  the untouched rest of the slice.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import masks as masks_lib  # pylint: disable=g-import-not-at-top
  x = _images(images, "images")
  m = _masks(masks, x.shape[0], "masks")
  if r_out is None:
    r_out = masks_lib.radius_for_size(6, x.shape[1])
  ring = np.asarray(masks_lib.ring(jnp.asarray(m[..., None], jnp.float32), r_out)) > 0.5
  return np.where(ring, x, -1.0).astype(np.float32)


def _features(f, name: str) -> np.ndarray:
  f = np.asarray(f, np.float64)
  if f.ndim < 2 or f.shape[0] < 2:
    raise ValueError(f"{name}: expected at least 2 feature vectors (N, D...), got {f.shape}")
  return f.reshape(f.shape[0], -1)


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(c)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)) in float64.

  tr((C1 C2)^(1/2)) = tr((C1^(1/2) C2 C1^(1/2))^(1/2)), a symmetric PSD matrix
  whose eigenvalues eigh gives; it agrees with scipy.linalg.sqrtm(...).real
  and stays real for rank-deficient covariances (fewer samples than features).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  s1 = _sqrt_psd(cov1)
  inner = s1 @ cov2 @ s1
  inner = (inner + inner.T) / 2  # symmetric up to rounding
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def frechet_distance(features_a, features_b) -> float:
  """Frechet distance between Gaussians fitted to two feature sets (FID form).

  ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)) with unbiased
  covariances, in float64. With fewer samples than features (a few hundred
  tumor slices, 512 features) the covariances are rank-deficient; then
  tr((C_a C_b)^(1/2)) is taken exactly as the sum of the singular values of
  A0 B0^T / sqrt((n_a - 1)(n_b - 1)) (A0, B0 the centred features: the
  nonzero eigenvalues of C_a C_b are those of A0 B0^T B0 A0^T, scaled),
  which avoids square roots of the many rounding-level eigenvalues;
  otherwise `gaussian_frechet` on the D x D covariances.

  Args:
    features_a, features_b: (N, D...) features (flattened per row), N >= 2.
  """
  a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
  (na, d), nb = a.shape, b.shape[0]
  if min(na, nb) > d:
    return gaussian_frechet(a.mean(0), np.cov(a, rowvar=False),
                            b.mean(0), np.cov(b, rowvar=False))
  a0, b0 = a - a.mean(0), b - b.mean(0)
  tr_sqrt = np.linalg.svd(a0 @ b0.T, compute_uv=False).sum() / np.sqrt((na - 1) * (nb - 1))
  diff = a.mean(0) - b.mean(0)
  return float(diff @ diff + (a0 * a0).sum() / (na - 1) + (b0 * b0).sum() / (nb - 1)
               - 2.0 * tr_sqrt)


def diversity(features) -> float:
  """Mean pairwise L2 distance between the feature vectors of a set (i < j).

  A set of copies scores 0; mode collapse lowers it against the real set's.
  """
  f = _features(features, "features")
  sq = (f * f).sum(axis=1)
  d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * (f @ f.T), 0.0, None)
  iu = np.triu_indices(f.shape[0], k=1)
  return float(np.sqrt(d2[iu]).mean())


class FeatureFn:
  """images (N, S, S, C) in [-1, 1] -> features (N, D) float64.

  Uses the memory bank's network (`matching.feature_extractor(backend)`):
  VGG16 pool5 maps, averaged over space ('mean': 512 numbers, what the
  Frechet distance is computed on) or flattened ('flatten'). Kept in float32
  on device and float64 after (the bank's own features are float16).
  """

  def __init__(self, backend: str = "vgg16_imagenet", seed: int = 0,
               pool: str = "mean", batch: int = 16):
    import jax  # pylint: disable=g-import-not-at-top
    from dfgm_jax.synthesis import matching  # pylint: disable=g-import-not-at-top
    if pool not in ("mean", "flatten"):
      raise ValueError(f"pool must be 'mean' or 'flatten', got {pool!r}")
    self.params, fn = matching.feature_extractor(backend, seed)
    self.pool, self.batch = pool, batch
    self._fn = jax.jit(fn)

  def __call__(self, images) -> np.ndarray:
    x = np.asarray(images, np.float32)
    out = []
    for i in range(0, len(x), self.batch):
      f = np.asarray(self._fn(self.params, x[i:i + self.batch]), np.float64)
      out.append(f.mean(axis=(1, 2)) if self.pool == "mean" else f.reshape(len(f), -1))
    if not out:
      raise ValueError("FeatureFn: no images")
    return np.concatenate(out)


def set_quality(images, masks, real_images, real_masks, sources=None,
                feature_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                r_out: int | None = None) -> dict:
  """The quality numbers of one synthetic set, named.

  Args:
    images, masks: the synthetic set (N, S, S, C) and its labels M.
    real_images, real_masks: real tumor slices and their masks (the reference).
    sources: the source tumor slice of each synthetic slice (N, S, S, C), for
      tumor preservation; left out when None.
    feature_fn: images -> (N, D) features; `FeatureFn()` (VGG16, ImageNet)
      when None.
    r_out: ring radius in pixels for the ring features (default as
      `ring_images`).

  Returns:
    {seam_score, boundary_gradient, real_boundary_gradient, preservation_mae
    (when sources are given), frechet, frechet_ring, diversity,
    real_diversity, n, n_real}.
  """
  feature_fn = feature_fn or FeatureFn()
  synth_g = boundary_gradient(images, masks)
  real_g = boundary_gradient(real_images, real_masks)
  f_syn, f_real = feature_fn(images), feature_fn(real_images)
  r_syn = feature_fn(ring_images(images, masks, r_out))
  r_real = feature_fn(ring_images(real_images, real_masks, r_out))
  out = {
      "seam_score": seam_score(images, masks, real_images, real_masks),
      "boundary_gradient": float(np.nanmean(synth_g)),
      "real_boundary_gradient": float(np.nanmean(real_g)),
      "frechet": frechet_distance(f_syn, f_real),
      "frechet_ring": frechet_distance(r_syn, r_real),
      "diversity": diversity(f_syn),
      "real_diversity": diversity(f_real),
      "n": int(len(f_syn)), "n_real": int(len(f_real)),
  }
  if sources is not None:
    out["preservation_mae"] = float(np.nanmean(tumor_preservation(images, sources, masks)))
  return out


# --- Kernel distance and the real-vs-real noise floor ----------------------
#
# A Frechet distance alone cannot say whether two sets differ: it is biased by
# the sample size and noisy at a few hundred slices (two halves of the same
# center's real slices were further apart than any synthetic set from the
# whole). KID adds an unbiased distance; `noise_floor` measures both between
# halves of the real patients and puts every synthetic set on the same footing
# (the same reference half, the same number of slices).


def polynomial_kernel(x, y) -> np.ndarray:
  """KID's cubic kernel k(x, y) = (x . y / d + 1)^3 between the rows of x and
  y: (N_x, N_y) float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx, kyy, kxy) -> float:
  """The unbiased estimate of MMD^2 from kernel matrices (Gretton et al. 2012):

  sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
  - 2 sum_{i, j} k(x_i, y_j) / (m n),

  kxx (m, m), kyy (n, n), kxy (m, n). Its expectation is 0 for two samples of
  one distribution, so it is negative about half the time then.
  """
  kxx, kyy, kxy = (np.asarray(k, np.float64) for k in (kxx, kyy, kxy))
  m, n = kxx.shape[0], kyy.shape[0]
  if m < 2 or n < 2:
    raise ValueError(f"mmd2_unbiased needs at least 2 samples a side, got {m} and {n}")
  sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(sxx + syy - 2.0 * kxy.mean())


# Above this many rows in all, KID computes the kernel of each subset instead
# of one Gram matrix of everything (6,000^2 float64 is 288 MB).
_GRAM_MAX_ROWS = 6000


def kernel_inception_distance(features_a, features_b, n_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> dict:
  """KID (Binkowski et al. 2018) between two feature sets, over subsets.

  m = min(n_a, n_b, subset_size); for each of n_subsets subsets, drawn by
  rng = np.random.default_rng(seed) as rng.choice(n_a, m, replace=False)
  then rng.choice(n_b, m, replace=False), the unbiased MMD^2
  (`mmd2_unbiased`) with the cubic `polynomial_kernel`. Unbiased at any m, so
  unlike the Frechet distance it does not grow when fewer slices are
  compared; it can be negative (two samples of one distribution: 0 on
  average). The kernel between all rows is computed once and the subsets
  index into it (for at most _GRAM_MAX_ROWS rows in all).

  Returns:
    {mean, std (over the subsets), n_subsets, subset_size (m)}.
  """
  a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
  if n_subsets < 1:
    raise ValueError(f"n_subsets must be at least 1, got {n_subsets}")
  na, nb = len(a), len(b)
  m = min(na, nb, int(subset_size))
  if m < 2:
    raise ValueError(f"subset_size {subset_size}: KID needs at least 2 samples a side")
  both = np.concatenate([a, b])
  gram = polynomial_kernel(both, both) if na + nb <= _GRAM_MAX_ROWS else None
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(int(n_subsets)):
    ia = rng.choice(na, m, replace=False)
    ib = na + rng.choice(nb, m, replace=False)
    if gram is not None:
      k = lambda i, j: gram[np.ix_(i, j)]  # pylint: disable=cell-var-from-loop
    else:
      k = lambda i, j: polynomial_kernel(both[i], both[j])
    values.append(mmd2_unbiased(k(ia, ia), k(ib, ib), k(ia, ib)))
  values = np.asarray(values)
  return {"mean": float(values.mean()), "std": float(values.std()),
          "n_subsets": int(n_subsets), "subset_size": int(m)}


def spread(values) -> dict | None:
  """{mean, min, max, p5, p95, n} of a list of numbers (None when empty)."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not len(v):
    return None
  p5, p95 = np.percentile(v, [5, 95])
  return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
          "p5": float(p5), "p95": float(p95), "n": int(len(v))}


def patient_halves(groups, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Row indices of two halves of the patients: floor(P / 2) patients, drawn
  by rng, and the others. groups: (N,) a patient id per row, P >= 2 of them."""
  groups = np.asarray([str(g) for g in groups])
  patients = np.unique(groups)
  if len(patients) < 2:
    raise ValueError(f"patient_halves needs at least 2 patients, got {len(patients)}")
  in_a = np.isin(groups, patients[rng.permutation(len(patients))[:len(patients) // 2]])
  return np.flatnonzero(in_a), np.flatnonzero(~in_a)


def noise_floor(real, real_groups, sets, n_splits: int = 20, seed: int = 0) -> dict:
  """FD and KID between halves of the real patients, and of every synthetic
  set against the same halves at the same number of slices.

  For each of n_splits random splits of the real patients into halves A and
  B (`patient_halves`), B is the reference. Compared with it, at one size m:
    - real: m slices of A (real against real, no patient on both sides);
    - each set: m of its slices whose source patient is in A (so that no
      tumor of a B patient is compared with itself), or of all its slices
      when its sources are not known (groups None).
  m = the smallest of |A| and every set's eligible count: every row of a
  split has the same n, so the Frechet distance's bias by n is the same for
  all. KID is the unbiased MMD^2 between the m slices and all of B. A split
  where m or |B| is under 2 is skipped.

  Args:
    real: (N, D) real features; real_groups: (N,) patient id per row.
    sets: name -> (features (M, D), source patient per row (M,) or None).
    n_splits: random splits; seed: their generator's seed.

  Returns:
    {n_splits (done), n (m per split), n_reference (|B| per split),
    real: {frechet: [...], kid: [...]}, sets: {name: {frechet, kid,
    by_source (bool)}}}, one value per split done, in the same order.
  """
  real = _features(real, "real")
  real_groups = np.asarray([str(g) for g in real_groups])
  feats = {k: _features(f, k) for k, (f, _) in sets.items()}
  groups = {k: None if g is None else np.asarray([str(x) for x in g])
            for k, (_, g) in sets.items()}
  k_rr = polynomial_kernel(real, real)
  k_ss = {k: polynomial_kernel(f, f) for k, f in feats.items()}
  k_sr = {k: polynomial_kernel(f, real) for k, f in feats.items()}
  rng = np.random.default_rng(seed)
  out = {"n": [], "n_reference": [], "real": {"frechet": [], "kid": []},
         "sets": {k: {"frechet": [], "kid": [], "by_source": groups[k] is not None}
                  for k in sorted(feats)}}
  for _ in range(int(n_splits)):
    a, b = patient_halves(real_groups, rng)
    in_a = set(real_groups[a])
    eligible = {k: (np.arange(len(f)) if groups[k] is None
                    else np.flatnonzero(np.isin(groups[k], list(in_a))))
                for k, f in feats.items()}
    m = min([len(a), *[len(e) for e in eligible.values()]])
    if m < 2 or len(b) < 2:
      continue
    out["n"].append(int(m))
    out["n_reference"].append(int(len(b)))
    ref, k_bb = real[b], k_rr[np.ix_(b, b)]
    pick = np.sort(rng.choice(a, m, replace=False))
    out["real"]["frechet"].append(frechet_distance(real[pick], ref))
    out["real"]["kid"].append(mmd2_unbiased(k_rr[np.ix_(pick, pick)], k_bb,
                                            k_rr[np.ix_(pick, b)]))
    for k in sorted(feats):
      rows = np.sort(rng.choice(eligible[k], m, replace=False))
      out["sets"][k]["frechet"].append(frechet_distance(feats[k][rows], ref))
      out["sets"][k]["kid"].append(mmd2_unbiased(k_ss[k][np.ix_(rows, rows)], k_bb,
                                                 k_sr[k][np.ix_(rows, b)]))
  out["n_splits"] = len(out["n"])
  return out


def fraction_below(x, y) -> float | None:
  """The fraction of paired values with x[i] < y[i] (None when there are none)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.mean(x < y)) if len(x) else None
