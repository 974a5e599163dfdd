"""The synthesis-quality table of every synthetic set (issue 12).

For each synthetic set given (dfgm and the baselines cutpaste and
anomalydiffusion) and each center it has a `<center>_synthetic` split of,
the numbers of dfgm_jax/eval/quality.py against that center's real tumor
slices, the `<center>_train` split (the very slices the set's tumors were cut
from):

  seam_score       boundary gradient of the synthetic tumors / that of real
                   tumors (1 = as sharp as real; a hard cut-paste edge is
                   above 1).
  preservation_mae mean |synthetic - source| inside the tumor mask M (0 = the
                   tumor kept exactly, as dfgm and cutpaste do).
  frechet          Frechet distance between VGG16 features of the synthetic
                   and the real tumor slices; frechet_ring the same on the
                   boundary ring only (the region dfgm regenerates).
  kid              kernel inception distance on the same features (unbiased
                   MMD^2, cubic kernel), mean and std over random subsets.
  diversity        mean pairwise feature distance within the set (the real
                   slices' own is in `reference`).

The real-vs-real noise floor: at a few hundred slices two halves
of the same real slices are as far apart as a synthetic set is from all of
them, so a distance says nothing by itself. `floor` splits the real patients
(the feature subsample's case ids) into random halves A and B,
config.evaluation.quality_real_splits times, and compares with B, all at one
n: m slices of A, and m slices of each set whose tumor source (found with the
salt) is a patient of A. Per set: the FD and KID spread over the splits and
the fraction of splits in which the set is further from B than A is; per
pair of sets, the fraction in which one is closer. The table calls a set
above the noise, or one set ahead of another, only at CONFIDENCE (90 %) by
both distances, and says "within the real-vs-real range" or "no ranking"
otherwise. Everything is computed from the features computed once.

Source of a synthetic slice: the real slice whose salted pseudonym (per
slice or per patient with the slice index, pipeline.source_rows) matches the
slice's `source` and `slice_index`. The tumor may have been moved before pasting
(config.synthesis.placement random_shift, hflip); which move was made is
read from the masks themselves, not from a config that may not be the one
that made the set: the source mask as it is, mirrored, shifted by the
difference of the two masks' centroids, or both, must reproduce the
synthetic mask exactly. A slice whose mask no move reproduces (or no source,
or two moves that disagree inside M) is left out of preservation and
counted, with the reason.

Cost: the features (VGG16 at 224 x 224, for the images and their rings) are
the expensive part; they are computed on at most `max_slices` slices per set
and center (a fixed subsample, chosen by the slices' keys, so the same
slices whatever order a reader returns). Seam and preservation use every slice.

Writes W/eval/quality.json: the numbers plus the identity of the inputs (the
sets' content fingerprints, the salt's hash, the settings). A rerun with the
same identity reuses it (the splits are read to fingerprint them, no feature
is computed); another identity is refused (errors.RunMismatch) unless
overwrite. The library never imports the data layer: `real` and the
synthetic sets are SliceData-like objects (manifest, split_size, load_split).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Callable, Mapping

import numpy as np

from dfgm_jax import errors
from dfgm_jax import stage_io
from dfgm_jax.eval import quality

EVAL = "eval"
QUALITY_JSON = "quality.json"
# Slices per set and center the features are computed on, when neither the
# caller nor config.evaluation.quality_max_slices says.
MAX_SLICES = 512
# Matching backends that are networks: their features serve realism too.
VGG_BACKENDS = ("vgg16_imagenet", "vgg16_random")
# Realism needs a network: the `pixels` matching backend falls back to this.
DEFAULT_BACKEND = "vgg16_imagenet"
# Seed of the fixed feature subsample.
_SUBSAMPLE_SEED = 0
# KID subsets and their size, and random splits of the real patients into
# halves (the noise floor), when config.evaluation does not say.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
REAL_SPLITS = 20
# Seed of the KID subsets and of the real-vs-real splits.
_FLOOR_SEED = 0
# A set is "above the real-vs-real range", or one set ranks ahead of another,
# only when it is so in at least this fraction of the splits, by FD and KID.
CONFIDENCE = 0.9
# ... and only when the real patients allow at least this many distinct
# halves (comb(P, P // 2): 5 patients give 10); with fewer the splits repeat
# a handful of configurations and their fractions are no evidence.
MIN_DISTINCT_SPLITS = 10
# Why a synthetic slice is left out of tumor preservation.
LEFT_OUT = ("no_source", "tumor_moved", "ambiguous")
PLACEMENTS = ("same", "mirrored", "shifted", "mirrored_shifted")


def path(workdir: str) -> str:
  """W/eval/quality.json."""
  return os.path.join(workdir, EVAL, QUALITY_JSON)


# --- Settings -------------------------------------------------------------------


def feature_backend(config) -> str:
  """config.synthesis.backend when it is a VGG16 one, else vgg16_imagenet."""
  backend = str(config.synthesis.backend) if "synthesis" in config else ""
  return backend if backend in VGG_BACKENDS else DEFAULT_BACKEND


def ring_radius(config, image_size: int) -> int:
  """r_out in pixels at `image_size`: config.mask.r_out_240 scaled as the model
  does (denoiser.radii), 6 px at 240 when the config has no mask section."""
  from dfgm_jax.synthesis import masks  # pylint: disable=g-import-not-at-top
  r_240 = float(config.mask.r_out_240) if "mask" in config else 6.0
  return masks.radius_for_size(r_240, image_size)


def default_max_slices(config) -> int:
  """config.evaluation.quality_max_slices when set, else MAX_SLICES (0: all)."""
  evaluation = config.get("evaluation") if hasattr(config, "get") else None
  if evaluation is not None and "quality_max_slices" in evaluation:
    return int(evaluation.quality_max_slices)
  return MAX_SLICES


def _evaluation_int(config, field: str, default: int) -> int:
  evaluation = config.get("evaluation") if hasattr(config, "get") else None
  if evaluation is not None and field in evaluation:
    return int(evaluation[field])
  return default


def floor_settings(config) -> dict:
  """{kid_subsets, kid_subset_size, real_splits}: config.evaluation's
  quality_kid_subsets, quality_kid_subset_size and quality_real_splits, else
  KID_SUBSETS, KID_SUBSET_SIZE, REAL_SPLITS."""
  return {"kid_subsets": _evaluation_int(config, "quality_kid_subsets", KID_SUBSETS),
          "kid_subset_size": _evaluation_int(config, "quality_kid_subset_size",
                                             KID_SUBSET_SIZE),
          "real_splits": _evaluation_int(config, "quality_real_splits", REAL_SPLITS)}


def subsample(keys, max_slices: int) -> np.ndarray:
  """Sorted row indices of a fixed subsample of a split, at most max_slices (0: all).

  Chosen on the rows ordered by their `key`, so the same slices are picked
  whatever order a reader returns them in.
  """
  keys = [str(k) for k in keys]
  if max_slices <= 0 or len(keys) <= max_slices:
    return np.arange(len(keys))
  order = np.argsort(keys, kind="stable")
  rng = np.random.default_rng(_SUBSAMPLE_SEED)
  return np.sort(order[rng.choice(len(keys), size=max_slices, replace=False)])


# --- Tumor preservation ---------------------------------------------------------


def _centroid(m: np.ndarray) -> np.ndarray:
  return np.argwhere(m).mean(axis=0)


def placed_source(mask: np.ndarray, src_image: np.ndarray, src_mask: np.ndarray
                  ) -> tuple[np.ndarray | None, str]:
  """The source slice moved as its tumor was placed, read from the masks.

  Tries the source mask as it is, mirrored left-right (hflip), shifted by the
  difference of the centroids (random_shift), and both; a move counts when it
  reproduces the synthetic mask exactly (a placed tumor is never clipped:
  compose.place keeps only shifts that keep all of it).

  Args:
    mask: (S, S[, 1]) the synthetic slice's mask M.
    src_image: (S, S, C) the source tumor slice; src_mask its (S, S[, 1]) mask.

  Returns:
    (image, how): the source image moved the same way (the pixels outside M
    are meaningless) and one of PLACEMENTS; or (None, reason), reason
    'tumor_moved' (no move reproduces M) or 'ambiguous' (two moves do, and
    the source pixels they put inside M differ).
  """
  m = np.asarray(mask).reshape(mask.shape[:2]) > 0.5
  t = np.asarray(src_mask).reshape(src_mask.shape[:2]) > 0.5
  if not m.any() or m.sum() != t.sum():
    return None, "tumor_moved"
  found = []
  for mirrored in (False, True):
    tf, xf = (t[:, ::-1], src_image[:, ::-1]) if mirrored else (t, src_image)
    dy, dx = np.rint(_centroid(m) - _centroid(tf)).astype(int)
    # np.roll wraps, but an exact match of M maps every tumor pixel onto M.
    if np.array_equal(np.roll(tf, (dy, dx), axis=(0, 1)), m):
      how = ("mirrored_" if mirrored else "") + ("shifted" if dy or dx else "")
      found.append((np.roll(xf, (dy, dx), axis=(0, 1)), how.rstrip("_") or "same"))
  if not found:
    return None, "tumor_moved"
  if len(found) == 2 and not np.array_equal(found[0][0][m], found[1][0][m]):
    return None, "ambiguous"  # a mask symmetric about a vertical axis.
  return found[0]


def preservation(synth: dict, real: dict, salt: str | None) -> dict:
  """Tumor preservation of a synthetic split against its real sources.

  Returns:
    {preservation_mae (mean over the slices kept; None when none is),
    preservation_n, preservation_left_out (LEFT_OUT -> count),
    placement (PLACEMENTS -> count of the slices kept)}.
  """
  from dfgm_jax.synthesis import pipeline  # pylint: disable=g-import-not-at-top
  left_out = dict.fromkeys(LEFT_OUT, 0)
  placement = dict.fromkeys(PLACEMENTS, 0)
  rows = {}
  if salt is not None:  # either provenance setting (pipeline.PROVENANCES).
    rows = pipeline.source_rows(real["case_id"], real["slice_index"], salt)
  keep, sources = [], []
  for i, (src, idx) in enumerate(zip(synth["source"], synth["slice_index"])):
    j = rows.get((str(src), int(idx)))
    if j is None:
      left_out["no_source"] += 1
      continue
    moved, how = placed_source(synth["mask"][i], real["image"][j], real["mask"][j])
    if moved is None:
      left_out[how] += 1
      continue
    placement[how] += 1
    keep.append(i)
    sources.append(moved)
  mae = None
  if keep:
    err = quality.tumor_preservation(np.asarray(synth["image"])[keep], np.stack(sources),
                                     np.asarray(synth["mask"])[keep])
    mae = float(np.nanmean(err))
  return {"preservation_mae": mae, "preservation_n": len(keep),
          "preservation_left_out": left_out, "placement": placement}


def source_patients(synth: dict, real: dict, salt: str | None) -> list[str] | None:
  """The real case id of each synthetic slice's source ('' when not found),
  through the salted pseudonyms as `preservation`; None without a salt or
  when no source is found."""
  from dfgm_jax.synthesis import pipeline  # pylint: disable=g-import-not-at-top
  if salt is None or "source" not in synth:
    return None
  rows = pipeline.source_rows(real["case_id"], real["slice_index"], salt)
  out = []
  for src, idx in zip(synth["source"], synth["slice_index"]):
    j = rows.get((str(src), int(idx)))
    out.append("" if j is None else str(real["case_id"][j]))
  return out if any(out) else None


# --- Inputs ---------------------------------------------------------------------


def _tumor_rows(d: dict) -> dict:
  """The rows of a split with a non-empty mask (a boundary to measure)."""
  keep = np.flatnonzero(np.asarray(d["mask"]).reshape(len(d["mask"]), -1).max(axis=1) > 0.5)
  if len(keep) == len(d["mask"]):
    return d
  return {k: (np.asarray(v)[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep])
          for k, v in d.items()}


def _keys(d: dict) -> list[str]:
  return list(d["key"]) if "key" in d else [str(i) for i in range(len(d["image"]))]


def _fingerprint(d: dict) -> str:
  """sha256 of a split's images, masks and provenance (16 hex digits)."""
  h = hashlib.sha256()
  for name in ("image", "mask"):
    a = np.ascontiguousarray(d[name])
    h.update(f"{name}{a.shape}{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
  for name in ("source", "slice_index", "case_id"):
    if name in d:
      h.update(f"{name}{list(map(str, d[name]))}".encode())
  return h.hexdigest()[:16]


def _describe(split: str, d: dict) -> dict:
  out = {"split": split, "num_slices": int(len(d["image"])), "sha256": _fingerprint(d)}
  if "mode" in d:
    out["modes"] = sorted({str(m) for m in d["mode"]})
  return out


def _missing(data, split: str) -> str | None:
  try:
    n = data.split_size(split)
  except errors.UserError as e:  # the data layer's NoSliceSet / UnknownSplit.
    return str(e)
  return f"split {split} is empty" if n == 0 else None


def _synthetic_centers(data) -> list[str]:
  suffix = "_synthetic"
  return sorted(s[:-len(suffix)] for s in data.manifest.get("splits", {})
                if s.endswith(suffix))


def _salt_id(salt: str | None) -> str | None:
  # The salt is private: only a hash of it enters the (shareable) record.
  return None if salt is None else hashlib.sha256(
      f"quality|{salt}".encode()).hexdigest()[:16]


def _feature_name(feature_fn, backend: str) -> str:
  if feature_fn is None:
    return f"{backend}/mean"
  return str(getattr(feature_fn, "name", None)
             or getattr(feature_fn, "__qualname__", type(feature_fn).__name__))


# --- The stage ------------------------------------------------------------------


def _feature_numbers(feature_fn, images, masks, r_out) -> dict:
  """Features of the images and of their rings (None with fewer than 2)."""
  if len(images) < 2:
    return {"f": None, "ring": None}
  return {"f": feature_fn(images),
          "ring": feature_fn(quality.ring_images(images, masks, r_out))}


def _frechet(a, b) -> float | None:
  return None if a is None or b is None else quality.frechet_distance(a, b)


def _kid(a, b, floor: dict) -> dict:
  if a is None or b is None:
    return {"kid": None, "kid_std": None}
  k = quality.kernel_inception_distance(a, b, floor["kid_subsets"], floor["kid_subset_size"],
                                        seed=_FLOOR_SEED)
  return {"kid": k["mean"], "kid_std": k["std"], "kid_subset_size": k["subset_size"]}


def floor_numbers(real_f, real_patients, set_features: dict, n_splits: int,
                  seed: int = _FLOOR_SEED) -> dict:
  """The real-vs-real noise floor of one center and every set against it.

  Args:
    real_f: (N, D) features of the real slices; real_patients: (N,) case ids.
    set_features: name -> (features (M, D), source case id per row or None).
    n_splits: random halves of the real patients (`quality.noise_floor`).

  Returns:
    {splits (done), patients, distinct_splits (distinct halves there are),
    n, n_reference (spreads of the sizes), real {frechet,
    kid}, sets {name: {frechet, kid (spreads), by_source, above_real
    {frechet, kid}: fraction of splits where the set is further from the
    reference half than the real half is}}, ahead [{set, other, frechet,
    kid}: fraction of splits where set is closer than other, other_closer
    {frechet, kid}: the other way round], values (the
    per-split numbers)}; or {reason} when it cannot be measured.
  """
  if real_f is None or len(set(map(str, real_patients))) < 2:
    return {"reason": "fewer than 2 real patients with features: no halves to compare"}
  values = quality.noise_floor(real_f, real_patients, set_features, n_splits, seed)
  if not values["n_splits"]:
    return {"reason": "no split left 2 slices a side (too few slices, or no set's "
                      "source in the first half)"}
  real = values["real"]
  sets, names = {}, sorted(values["sets"])
  for name in names:
    v = values["sets"][name]
    sets[name] = {"frechet": quality.spread(v["frechet"]), "kid": quality.spread(v["kid"]),
                  "by_source": v["by_source"],
                  "above_real": {k: quality.fraction_below(real[k], v[k])
                                 for k in ("frechet", "kid")}}
  v = values["sets"]
  ahead = [{"set": a, "other": b,
            **{k: quality.fraction_below(v[a][k], v[b][k]) for k in ("frechet", "kid")},
            "other_closer": {k: quality.fraction_below(v[b][k], v[a][k])
                             for k in ("frechet", "kid")}}
           for i, a in enumerate(names) for b in names[i + 1:]]
  patients = len(set(map(str, real_patients)))
  return {"splits": values["n_splits"], "patients": patients,
          "distinct_splits": math.comb(patients, patients // 2),
          "n": quality.spread(values["n"]),
          "n_reference": quality.spread(values["n_reference"]),
          "real": {k: quality.spread(real[k]) for k in ("frechet", "kid")},
          "sets": sets, "ahead": ahead, "values": values}


def run(config, workdir: str, real, synthetic: Mapping[str, Any] | None, *,
        salt: str | None, overwrite: bool = False, max_slices: int | None = None,
        feature_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
  """The quality numbers of every synthetic set, in W/eval/quality.json.

  Args:
    config: the run's config; reads synthesis.backend (the features' VGG16
      weights, vgg16_imagenet when it is `pixels`), mask.r_out_240 and
      data-independent evaluation.quality_max_slices, quality_kid_subsets,
      quality_kid_subset_size and quality_real_splits when present.
    workdir: W; writes W/eval/quality.json.
    real: the real slice set (SliceData-like), with <center>_train splits.
    synthetic: set name (dfgm, cutpaste, anomalydiffusion) -> SliceData-like
      with <center>_synthetic splits, or None when that set does not exist
      (listed in `skipped`).
    salt: the synthesis salt of the source pseudonyms (W/private/salt); None
      leaves preservation out (every slice counted as no_source).
    overwrite: replace a quality.json of another identity (else refused).
    max_slices: slices per set and center for the features (a fixed
      subsample; 0: all); default config.evaluation.quality_max_slices, else
      MAX_SLICES.
    feature_fn: images (N, S, S, C) -> features (N, D); default
      quality.FeatureFn(backend) (made only when features are computed).

  Returns:
    quality.json's content: identity; settings {features, r_out, max_slices,
    kid_subsets, kid_subset_size, real_splits};
    reference {center: {split, n, n_features, boundary_gradient,
    diversity}}; sets {name: {center: {split, modes, n, n_features,
    seam_score, boundary_gradient, real_boundary_gradient, preservation_mae,
    preservation_n, preservation_left_out, placement, frechet, kid, kid_std,
    kid_subset_size, frechet_ring, diversity}}}; floor {center:
    `floor_numbers`}; skipped [{set, center (when one center), reason}]; plus
    "path" and "reused". On processes other than 0 only path and reused:
    process 0 computes and writes.

  Raises:
    errors.RunMismatch: quality.json holds another identity (inputs or
      settings) and not overwrite; before any feature is computed.
  """
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  out_path = path(workdir)
  if not parallel.is_main():
    return {"path": out_path, "reused": False}
  synthetic = dict(synthetic or {})
  max_slices = default_max_slices(config) if max_slices is None else int(max_slices)
  backend = feature_backend(config)

  # Inputs and identity first: a reuse or a refusal costs no feature.
  skipped, splits, refs = [], {}, {}
  for name in sorted(synthetic):
    data = synthetic[name]
    if data is None:
      skipped.append({"set": name, "reason": f"no {name} synthetic set"})
      continue
    centers = _synthetic_centers(data)
    if not centers:
      skipped.append({"set": name, "reason": "the set has no <center>_synthetic split"})
    for center in centers:
      split, ref_split = f"{center}_synthetic", f"{center}_train"
      why = _missing(data, split)
      if not why and center not in refs:
        why = _missing(real, ref_split)
        if not why:
          refs[center] = _tumor_rows(real.load_split(ref_split))
          why = None if len(refs[center]["image"]) else f"{ref_split} has no tumor slice"
          if why:
            del refs[center]
      if not why:
        splits[(name, center)] = data.load_split(split)
        if not _tumor_rows(splits[(name, center)])["image"].shape[0]:
          why = f"{split} has no slice with a tumor mask"
          del splits[(name, center)]
      if why:
        skipped.append({"set": name, "center": center, "reason": why})
  image_size = next(iter(refs.values()))["image"].shape[1] if refs else int(
      config.data.image_size)
  r_out = ring_radius(config, image_size)
  floor = floor_settings(config)
  settings = {"features": _feature_name(feature_fn, backend), "r_out": r_out,
              "max_slices": max_slices, **floor}
  identity = {
      "settings": settings, "salt_sha256": _salt_id(salt),
      "reference": {c: _describe(f"{c}_train", d) for c, d in sorted(refs.items())},
      "sets": {n: {c: _describe(f"{c}_synthetic", d) for (n2, c), d in sorted(splits.items())
                   if n2 == n} for n in sorted(synthetic)},
      "skipped": skipped}
  record = stage_io.check_done(
      out_path, identity, what="synthesis-quality numbers", overwrite=overwrite,
      remedy="Pass overwrite=True (--overwrite) to recompute them, or use another workdir.")
  if record is not None:
    return {**record, "path": out_path, "reused": True}

  feature_fn = feature_fn or quality.FeatureFn(backend, seed=int(config.get("seed", 0)))
  reference, ref_features = {}, {}
  for center, ref in sorted(refs.items()):
    rows = subsample(_keys(ref), max_slices)
    ref_features[center] = _feature_numbers(feature_fn, ref["image"][rows],
                                            ref["mask"][rows], r_out)
    f = ref_features[center]["f"]
    reference[center] = {
        "split": f"{center}_train", "n": int(len(ref["image"])),
        "n_features": int(len(rows)),
        "boundary_gradient": float(np.nanmean(quality.boundary_gradient(
            ref["image"], ref["mask"]))),
        "diversity": None if f is None else quality.diversity(f)}
    ref_features[center]["patients"] = [str(ref["case_id"][i]) for i in rows]
  sets = {n: {} for n in sorted(synthetic) if synthetic[n] is not None}
  set_features = {}
  for (name, center), d in sorted(splits.items()):
    ref = refs[center]
    tumors = _tumor_rows(d)
    rows = subsample(_keys(tumors), max_slices)
    feats = _feature_numbers(feature_fn, tumors["image"][rows], tumors["mask"][rows], r_out)
    patients = source_patients(tumors, ref, salt)
    set_features.setdefault(center, {})[name] = (
        feats["f"], None if patients is None else [patients[i] for i in rows])
    g = quality.boundary_gradient(tumors["image"], tumors["mask"])
    sets[name][center] = {
        "split": f"{center}_synthetic", "modes": sorted({str(m) for m in d.get("mode", [])}),
        "n": int(len(d["image"])), "n_features": int(len(rows)),
        "seam_score": quality.seam_score(tumors["image"], tumors["mask"],
                                         ref["image"], ref["mask"]),
        "boundary_gradient": float(np.nanmean(g)),
        "real_boundary_gradient": reference[center]["boundary_gradient"],
        **preservation(d, ref, salt),
        "frechet": _frechet(feats["f"], ref_features[center]["f"]),
        **_kid(feats["f"], ref_features[center]["f"], floor),
        "frechet_ring": _frechet(feats["ring"], ref_features[center]["ring"]),
        "diversity": None if feats["f"] is None else quality.diversity(feats["f"]),
    }
  noise = {}
  for center, by_set in sorted(set_features.items()):
    ref_f = ref_features[center]
    usable = {k: v for k, v in by_set.items() if v[0] is not None}
    noise[center] = floor_numbers(ref_f["f"], ref_f["patients"], usable,
                                  floor["real_splits"])
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  record = stage_io.mark_done(out_path, identity, settings=settings, reference=reference,
                              sets=sets, floor=noise, skipped=skipped)
  return {**record, "path": out_path, "reused": False}


# --- The table ------------------------------------------------------------------

COLUMNS = (
    ("seam", "seam_score", "boundary gradient of the synthetic tumors / that of "
     "the real ones: 1 = as sharp as real boundaries; above 1 a visible edge "
     "(cut-paste), below 1 a boundary smoothed away. Closer to 1 is better."),
    ("preservation MAE", "preservation_mae", "mean absolute error inside the "
     "tumor mask against the source tumor slice, in [-1, 1] intensity units: "
     "0 = the real tumor kept exactly. Lower is better."),
    ("Frechet", "frechet", "Frechet distance between VGG16 features of the "
     "synthetic and the real tumor slices (FID form): lower = closer to real. "
     "It grows when few slices are compared, so compare rows of equal n; the "
     "real-vs-real row is its noise floor."),
    ("KID", "kid", "kernel inception distance on the same features: the unbiased "
     "MMD^2 with the cubic kernel (x.y/d + 1)^3, mean ± std over random subsets of "
     "equal size; 0 on average for two samples of one distribution (so it can be "
     "negative) and not biased by n. Lower = closer to real. The ± is the spread "
     "over subsets of the same slices (0 when every slice is in each subset), not "
     "the sampling noise: for that see the real-vs-real rows."),
    ("Frechet (ring)", "frechet_ring", "the same on the boundary ring "
     "dilate(M) minus M only (everything else blanked): the region dfgm "
     "regenerates. Lower is better."),
    ("diversity", "diversity", "mean pairwise distance between the features of "
     "the set: 0 for copies; near the real slices' own diversity is good, far "
     "below it means collapse."),
)
WITHIN = ("within the real-vs-real range: the table cannot tell this set from real "
          "slices at this sample size")


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float) and 0 < abs(v) < 1e-9:
    return "~0"  # rounding of a distance that is 0.
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
  return str(v)


def _cell(r: dict, key: str) -> str:
  if key == "kid" and r.get("kid") is not None and r.get("kid_std") is not None:
    return f"{_fmt(r['kid'])} ± {_fmt(r['kid_std'])}"
  return _fmt(r.get(key))


def _range(s: dict | None) -> str:
  """mean [min, max] of a `quality.spread`."""
  if not s:
    return "n/a"
  return f"{_fmt(s['mean'])} [{_fmt(s['min'])}, {_fmt(s['max'])}]"


def _pct(f) -> str:
  return "n/a" if f is None else f"{f:.0%}"


def _n(s: dict | None) -> str:
  if not s:
    return "n/a"
  lo, hi = int(s["min"]), int(s["max"])
  return str(lo) if lo == hi else f"{lo}-{hi}"


def set_verdict(above_real: dict) -> str:
  """Whether a set is further from real than real is from itself: 'above'
  when in at least CONFIDENCE of the splits by FD and by KID, 'within' when
  by neither, else 'disagree'."""
  hits = [(above_real.get(k) or 0.0) >= CONFIDENCE for k in ("frechet", "kid")]
  return "above" if all(hits) else "within" if not any(hits) else "disagree"


def pair_verdict(ahead: dict) -> str | None:
  """The set that ranks ahead (lower FD and KID in at least CONFIDENCE of the
  splits), or None: no ranking."""
  fd, kid = ahead.get("frechet"), ahead.get("kid")
  if fd is None or kid is None:
    return None
  if fd >= CONFIDENCE and kid >= CONFIDENCE:
    return ahead["set"]
  other = ahead.get("other_closer", {})
  if (other.get("frechet") or 0.0) >= CONFIDENCE and (other.get("kid") or 0.0) >= CONFIDENCE:
    return ahead["other"]
  return None


def _floor_words(center: str, fl: dict) -> list[str]:
  """One sentence per set against the noise floor and one per pair of sets."""
  if "reason" in fl:
    return [f"- Real-vs-real noise ({center}): not measured, {fl['reason']}; without it "
            "the table cannot say whether any difference above is more than noise."]
  k, real = fl["splits"], fl["real"]
  out = [f"- Real-vs-real noise ({center}): over {k} random halves of the "
         f"{fl.get('patients', '?')} real patients, FD {_range(real['frechet'])}, KID "
         f"{_range(real['kid'])} (n = {_n(fl['n'])} against {_n(fl['n_reference'])} "
         "slices of the other half)."]
  distinct = fl.get("distinct_splits")
  if distinct is not None and distinct < MIN_DISTINCT_SPLITS:
    out.append(f"- {center}: {fl['patients']} real patients give only {distinct} distinct "
               f"halves (fewer than {MIN_DISTINCT_SPLITS}): the splits are no evidence "
               "either way, so no set is called above or within the noise and no set "
               "ranks ahead of another.")
    return out
  for name, r in sorted(fl["sets"].items()):
    above = r["above_real"]
    v = set_verdict(above)
    how = (f"further from the reference half than the real half is in "
           f"{_pct(above['frechet'])} (FD) and {_pct(above['kid'])} (KID) of {k} splits")
    if v == "above":
      words = "above the real-vs-real range: this set differs from real slices by more than the noise"
    elif v == "within":
      words = WITHIN
    else:
      words = (f"FD and KID disagree at the {CONFIDENCE:.0%} level: no verdict (a "
               "difference from real slices is not established)")
    src = "" if r.get("by_source") else (
        " (its sources are unknown: its subsamples may hold tumors of the reference "
        "half, which favours it)")
    out.append(f"- {name} ({center}): FD {_range(r['frechet'])}, KID {_range(r['kid'])}; "
               f"{how}: {words}.{src}")
  for a in fl.get("ahead", []):
    first = pair_verdict(a)
    fd, kid = _pct(a["frechet"]), _pct(a["kid"])
    if first is None:
      out.append(f"- {a['set']} vs {a['other']} ({center}): {a['set']} is closer to real "
                 f"in {fd} (FD) and {kid} (KID) of {k} splits, under {CONFIDENCE:.0%} "
                 "either way: no ranking.")
    else:
      second = a["other"] if first == a["set"] else a["set"]
      won = a if first == a["set"] else a["other_closer"]
      out.append(f"- {a['set']} vs {a['other']} ({center}): {first} ranks ahead of "
                 f"{second}: closer to real in {_pct(won['frechet'])} (FD) and "
                 f"{_pct(won['kid'])} (KID) of {k} splits.")
  return out


def _floor_table(floor: dict) -> list[str]:
  lines = ["| compared with the other half of the real patients | center | n (vs n) | "
           "Frechet mean [min, max] | KID mean [min, max] | further than real half "
           "(FD / KID) |", "|---|---|---|---|---|---|"]
  for center, fl in sorted(floor.items()):
    if "reason" in fl:
      continue
    n = f"{_n(fl['n'])} (vs {_n(fl['n_reference'])})"
    lines.append(f"| real: one half of the patients | {center} | {n} | "
                 f"{_range(fl['real']['frechet'])} | {_range(fl['real']['kid'])} | - |")
    for name, r in sorted(fl["sets"].items()):
      lines.append(f"| {name} | {center} | {n} | {_range(r['frechet'])} | "
                   f"{_range(r['kid'])} | {_pct(r['above_real']['frechet'])} / "
                   f"{_pct(r['above_real']['kid'])} |")
  return lines if len(lines) > 2 else []


def table(quality_numbers: dict) -> str:
  """Markdown: one row per set (and center), the real reference and the
  real-vs-real noise floor, the sets at the floor's n, and what the numbers
  say and do not say."""
  header = ["set", "center", "n", *[c[0] for c in COLUMNS]]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  sets = quality_numbers.get("sets", {})
  floor = quality_numbers.get("floor", {})
  for name in sorted(sets):
    for center, r in sorted(sets[name].items()):
      n = f"{r['n']}" + (f" ({r['n_features']} for features)"
                         if r["n_features"] != r["n"] else "")
      cells = [name, center, n, *[_cell(r, key) for _, key, _ in COLUMNS]]
      lines.append("| " + " | ".join(cells) + " |")
  for center, r in sorted(quality_numbers.get("reference", {}).items()):
    cells = [f"real ({r['split']})", center, str(r["n"]),
             *["0" if key in ("frechet", "kid", "frechet_ring") else
               "1" if key == "seam_score" else "0" if key == "preservation_mae" else
               _fmt(r["diversity"]) for _, key, _ in COLUMNS]]
    lines.append("| " + " | ".join(cells) + " |")
    fl = floor.get(center, {})
    if "real" in fl:
      cells = ["real vs real (halves of the patients)", center,
               f"{_n(fl['n'])} vs {_n(fl['n_reference'])}",
               *[_range(fl["real"][key]) if key in ("frechet", "kid") else "-"
                 for _, key, _ in COLUMNS]]
      lines.append("| " + " | ".join(cells) + " |")
  if not sets:
    lines = ["No synthetic set was measured."]
  settings = quality_numbers.get("settings", {})
  max_slices = settings.get("max_slices")
  out = ["Synthesis quality: each synthetic set against the real tumor slices of "
         "its center (the <center>_train split, the tumors' sources). Features: "
         f"{settings.get('features', '?')}, on "
         + (f"at most {max_slices} slices per set (a fixed subsample); "
            if max_slices else "every slice; ")
         + f"ring radius r_out = {settings.get('r_out', '?')} px"
         + (f"; KID over {settings['kid_subsets']} subsets of at most "
            f"{settings['kid_subset_size']} slices" if "kid_subsets" in settings else "")
         + ".", "", *lines, ""]
  out += [f"- **{label}**: {text}" for label, _, text in COLUMNS]
  if floor:
    out += ["", "**Against the real-vs-real noise.** A distance means something only "
            "against the distance between two samples of real slices. The real patients "
            f"are split into random halves ({settings.get('real_splits', '?')} times); "
            "one half is the reference, and the other half's slices and each set's "
            "slices whose tumor comes from a patient of that other half (so no tumor is "
            "compared with itself) are compared with it, all at the same n (the Frechet "
            "distance grows as n shrinks, so only rows of equal n compare). A set is "
            f"called above the noise, or ahead of another set, only when it is so in at "
            f"least {CONFIDENCE:.0%} of the splits by FD and by KID.", ""]
    out += _floor_table(floor)
    out += [""]
    for center, fl in sorted(floor.items()):
      out += _floor_words(center, fl)
  elif sets:
    out += ["", "No real-vs-real noise floor was measured (a quality.json from before "
            "the noise floor was added): the distances above cannot be told from sampling noise."]
  for name in sorted(sets):
    for center, r in sorted(sets[name].items()):
      gone = {k: v for k, v in r["preservation_left_out"].items() if v}
      if gone:
        out.append(f"- {name} ({center}): {r['preservation_n']} slices in preservation; "
                   "left out: " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                            for k, v in gone.items())
                   + " (no source found with the salt, or a tumor no mirror/shift "
                   "of its source reproduces).")
  for s in quality_numbers.get("skipped", []):
    where = f" ({s['center']})" if "center" in s else ""
    out.append(f"- skipped: {s['set']}{where}: {s['reason']}")
  return "\n".join(out) + "\n"
