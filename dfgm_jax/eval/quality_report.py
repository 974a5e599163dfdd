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
  diversity        mean pairwise feature distance within the set (the real
                   slices' own is in `reference`).

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


def run(config, workdir: str, real, synthetic: Mapping[str, Any] | None, *,
        salt: str | None, overwrite: bool = False, max_slices: int | None = None,
        feature_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
  """The quality numbers of every synthetic set, in W/eval/quality.json.

  Args:
    config: the run's config; reads synthesis.backend (the features' VGG16
      weights, vgg16_imagenet when it is `pixels`), mask.r_out_240 and
      data-independent evaluation.quality_max_slices when present.
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
    quality.json's content: identity; settings {features, r_out, max_slices};
    reference {center: {split, n, n_features, boundary_gradient,
    diversity}}; sets {name: {center: {split, modes, n, n_features,
    seam_score, boundary_gradient, real_boundary_gradient, preservation_mae,
    preservation_n, preservation_left_out, placement, frechet, frechet_ring,
    diversity}}}; skipped [{set, center (when one center), reason}]; plus
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
  settings = {"features": _feature_name(feature_fn, backend), "r_out": r_out,
              "max_slices": max_slices}
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
  sets = {n: {} for n in sorted(synthetic) if synthetic[n] is not None}
  for (name, center), d in sorted(splits.items()):
    ref = refs[center]
    tumors = _tumor_rows(d)
    rows = subsample(_keys(tumors), max_slices)
    feats = _feature_numbers(feature_fn, tumors["image"][rows], tumors["mask"][rows], r_out)
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
        "frechet_ring": _frechet(feats["ring"], ref_features[center]["ring"]),
        "diversity": None if feats["f"] is None else quality.diversity(feats["f"]),
    }
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  record = stage_io.mark_done(out_path, identity, settings=settings, reference=reference,
                              sets=sets, skipped=skipped)
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
     "It grows when few slices are compared, so compare rows of equal n."),
    ("Frechet (ring)", "frechet_ring", "the same on the boundary ring "
     "dilate(M) minus M only (everything else blanked): the region dfgm "
     "regenerates. Lower is better."),
    ("diversity", "diversity", "mean pairwise distance between the features of "
     "the set: 0 for copies; near the real slices' own diversity is good, far "
     "below it means collapse."),
)


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float) and 0 < abs(v) < 1e-9:
    return "~0"  # rounding of a distance that is 0.
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
  return str(v)


def table(quality_numbers: dict) -> str:
  """Markdown: one row per set (and center), the real reference, and what the
  columns mean."""
  header = ["set", "center", "n", *[c[0] for c in COLUMNS]]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  sets = quality_numbers.get("sets", {})
  for name in sorted(sets):
    for center, r in sorted(sets[name].items()):
      n = f"{r['n']}" + (f" ({r['n_features']} for features)"
                         if r["n_features"] != r["n"] else "")
      cells = [name, center, n, *[_fmt(r.get(key)) for _, key, _ in COLUMNS]]
      lines.append("| " + " | ".join(cells) + " |")
  for center, r in sorted(quality_numbers.get("reference", {}).items()):
    cells = [f"real ({r['split']})", center, str(r["n"]), "1", "0", "0", "0",
             _fmt(r["diversity"])]
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
         + f"ring radius r_out = {settings.get('r_out', '?')} px.", "", *lines, ""]
  out += [f"- **{label}**: {text}" for label, _, text in COLUMNS]
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
