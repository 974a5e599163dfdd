"""The privacy audit as one run(): every check of ALGORITHM.md section 9 (issue 14).

Inputs: candidates (a synthetic set, or any real split: the training split
itself must come out 100 % flagged), the audited center's private training
slices and its held-out test slices (the reference population every
threshold is calibrated on), and, when they exist, G1's and G2's exports, a
local synthesis set of G2 in generate mode, and what would be shared.

Checks (privacy.json keys):
  regions          per region full / ring / background / tumor, on the
                   aligned distance (minimum over small shifts, flips and
                   quarter turns): exact and near copies, DCR against the
                   held-out slices' DCR, NN ratio d1/d2, Carlini's calibrated
                   distance, thresholds with intervals over resampled
                   held-out patients (memorization.region_audit). The tumor
                   interior is copied from the source slice by design: it is
                   reported as such, never counted as a finding.
  source           each candidate's own source slice (salted pseudonym of a
                   synthetic set, or the case id of a real split): how many
                   are nearest to it, and source-ring replication.
  membership       membership inference against G1 and G2 when their exports
                   exist: loss and calibrated attacks with patient-bootstrap
                   intervals (privacy/membership.py, attack_stats.py).
  g2_samples       item 6: G2's generate-mode samples nearer S than the
                   private slices (only when such a local set exists).
  scan             raw case ids, patient ids, paths and the salt in the
                   files that would be shared (privacy/scan.py).
  backgrounds      every background of a synthetic set, its salted key
                   matched through the salt to the slices' manifest: the
                   fraction that is not a public-origin slice is a leak.
  verdicts         one line per check in plain words; `summary` the numbers
                   and verdicts that can be shown outside the center.

What it writes (out_dir, W/privacy by default; atomically, the record last):
  privacy.json       PRIVATE: everything (per-candidate indices, scan hits
                     with the matched text).
  privacy.md         PRIVATE: the same for a reader, with what each number
                     means and what is a warning sign.
  summary.json       SHAREABLE: `summary` alone (numbers, the center's
                     public name, verdicts; no id, no path, no index),
                     itself scanned before it is written. G2's model card
                     copies it (train/g2.py audit_for_card).
  closest_pairs.png  PRIVATE: the closest candidate / training pairs.
  record.json        the done-record, written last (an earlier audit's
                     record and outputs are removed before any work): a
                     rerun of the same identity reuses the audit, one of
                     another identity is refused. It names the candidates
                     (folder, split, kind, set fingerprint) and the
                     summary's sha256: G2's card takes only a finished
                     audit of its own synthetic set (train/g2.py
                     audit_for_card).

The library never imports the data layer: slice sets come in as objects with
`manifest` and `load_split` (data_pipeline.slice_sets.SliceData).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Callable

import numpy as np
from absl import logging

from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax import stage_io
from dfgm_jax.privacy import distances
from dfgm_jax.privacy import memorization
from dfgm_jax.privacy import scan as scan_lib
from dfgm_jax.train import g2 as g2_lib

PRIVACY_JSON = "privacy.json"
PRIVACY_MD = "privacy.md"
SUMMARY_JSON = "summary.json"
FIGURE = "closest_pairs.png"
RECORD = "record.json"
FORMAT = "dfgm-jax-privacy-audit-1"
# The source ring warns when more than this fraction of the candidates is
# replicated (the region checks calibrate themselves: memorization.py).
ALERT_FRACTION = 0.05
# Membership: an AUC a privacy reviewer would call a leak. An attack whose
# interval reaches it while also holding 0.5 shows nothing either way: "not
# detected at this sample size", never "ok".
LEAK_AUC = 0.6
# Fewer patients than this on either side: a patient bootstrap cannot show
# how much the score varies between patients, and no verdict is drawn.
MIN_PATIENTS = 5
# The false-positive rate membership's TPR is asked at (ALGORITHM.md 9.5);
# the rate reached with the held-out slices at hand is what is reported.
MEMBERSHIP_FPR = 0.01
AUDIT_REGIONS = ("full", "ring", "background", "tumor")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The audit's parameters (part of its identity)."""

  carlini_n: int = memorization.CARLINI_N
  carlini_alpha: float = memorization.CARLINI_ALPHA
  # The aligned distance: shifts up to max_shift pixels, mirrored and
  # quarter-turned candidates (distances.nearest_aligned).
  max_shift: int = 2
  flips: bool = True
  rotations: bool = True
  # Calibration on the held-out slices (memorization.py): the quantile taken
  # as threshold, patient-bootstrap draws, the confidence a warning needs,
  # the near-copy margin and the fewest held-out patients that calibrate.
  heldout_quantile: float = memorization.HELDOUT_QUANTILE
  n_bootstrap: int = memorization.N_BOOTSTRAP
  confidence: float = memorization.CONFIDENCE
  copy_margin: float = memorization.COPY_MARGIN
  min_heldout_patients: int = memorization.MIN_HELDOUT_PATIENTS
  n_other: int = memorization.N_OTHER
  seed: int = 0
  chunk_q: int = 32
  chunk_r: int = 64
  membership: bool = True
  figure_pairs: int = 8


@dataclasses.dataclass
class Inputs:
  """What one audit reads.

  real: the preprocessed slices (<center>_train, <center>_test, manifest).
  candidates, candidate_split: the set audited and its split.
  center: the audited center (public name, e.g. CBICA).
  salt: the center's salt (W/private/salt): maps a synthetic set's source
    pseudonyms back to training slices; None: no source checks for it.
  g1_dir, g2_dir: exports of G1 and G2 (None or missing: skipped).
  local: G2's local synthesis set (skipped unless made in generate mode).
  public: S, the published synthetic set the local set's tumors came from.
  shared: name -> file or folder that would be shared (the scan's targets).
  figures: folders whose PNG metadata is scanned (not their pixels).
  private_paths: absolute paths that must not appear in shared files.
  """

  real: Any
  candidates: Any
  candidate_split: str
  center: str
  salt: str | None = None
  g1_dir: str | None = None
  g2_dir: str | None = None
  local: Any | None = None
  public: Any | None = None
  shared: dict = dataclasses.field(default_factory=dict)
  figures: tuple = ()
  private_paths: tuple = ()


class NoHeldOut(errors.UserError):
  """The audited center has no held-out (or no training) slices to calibrate on."""


# --- Loading -----------------------------------------------------------------


def _split(data, split: str, what: str, error=errors.UserError) -> dict:
  splits = data.manifest.get("splits", {})
  if split not in splits:
    raise error(f"{data.data_dir}: no split {split!r} for the {what}; "
                f"splits: {sorted(splits)}")
  if not splits[split].get("num_slices"):
    raise error(f"{data.data_dir}: split {split!r} ({what}) is empty; the "
                "audit needs it (more cases, or another --center)")
  return data.load_split(split)


def _has_manifest(path: str) -> bool:
  return bool(path) and os.path.exists(os.path.join(path, "manifest.json"))


def workdir_inputs(config, workdir: str, slice_data, *, candidates: str | None = None,
                   center: str | None = None, out_dir: str | None = None) -> Inputs:
  """The audit's inputs from a pipeline workdir W (README's workdir layout).

  Args:
    config: the run's config (train.center: the default center).
    workdir: W: slices/, synthetic/, private/salt, model/, g2_model/, local/.
    slice_data: folder -> a slice set (data_pipeline.slice_sets.SliceData).
    candidates: "DIR:SPLIT" to audit another set or a real split (e.g.
      W/slices:CBICA_train); default W/synthetic's <center>_synthetic.
    center: the audited center (default config.train.center).
    out_dir: where the audit writes (its figure's metadata is scanned).
  """
  real_dir = os.path.join(workdir, "slices")
  real = slice_data(real_dir)
  center = center or config.train.center
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  # W/synthetic, or W/private/synthetic for a set made on private backgrounds.
  shared_set = stage.synthetic_dir(workdir)
  if candidates:
    cand_dir, sep, split = candidates.rpartition(":")
    if not sep or not cand_dir or not split:
      raise errors.UserError(f"--candidates={candidates}: expected DIR:SPLIT, e.g. "
                             f"{shared_set}:{center}_synthetic")
  else:
    cand_dir, split = shared_set, f"{center}_synthetic"
  cand = slice_data(cand_dir)
  salt = stage.read_salt(workdir)
  local_dir = os.path.join(workdir, "local", "synthetic")
  shared = {"synthetic set": shared_set, "G2 export": os.path.join(workdir, "g2_model")}
  # A synthetic set given as candidates would be shared too; a preprocessing
  # output (fingerprint, cases) is private by definition: not scanned.
  if os.path.abspath(cand_dir) != os.path.abspath(shared_set) and not (
      "cases" in cand.manifest or "fingerprint" in cand.manifest):
    shared["candidates"] = cand_dir
  paths = [workdir, os.path.abspath(workdir), real_dir, os.path.abspath(real_dir)]
  return Inputs(
      real=real, candidates=cand, candidate_split=split, center=center, salt=salt,
      g1_dir=os.path.join(workdir, "model"), g2_dir=os.path.join(workdir, "g2_model"),
      local=slice_data(local_dir) if _has_manifest(local_dir) else None,
      public=slice_data(shared_set) if _has_manifest(shared_set) else None,
      shared=shared,
      figures=tuple(d for d in (os.path.join(workdir, "private", "figures"),
                                os.path.join(workdir, "eval", "figures"), out_dir) if d),
      private_paths=tuple(p for p in paths if os.path.isabs(p)))


def content_id(arrays: dict) -> str:
  """sha256 (16 hex) of a split's images and masks: what the audit saw."""
  h = hashlib.sha256()
  for key in ("image", "mask"):
    a = np.ascontiguousarray(arrays[key])
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def _model_id(model_dir: str | None) -> str | None:
  """params_sha256 of an export, None when there is none."""
  if not model_dir or not model_io.is_export(model_dir):
    return None
  return model_io.read_record(model_dir).get("params_sha256")


def regions_of(masks, r_out: int, r_in: int) -> dict:
  """The four audit regions of (N, H, W, 1) tumor masks, per image channel-free."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import masks as masks_lib  # pylint: disable=g-import-not-at-top
  tumor = (np.asarray(masks) > 0.5).astype(np.float32)
  ring = np.asarray(masks_lib.ring(jnp.asarray(tumor), r_out, r_in))
  return distances.region_masks(tumor, ring)


def _channels(mask: np.ndarray, images: np.ndarray) -> np.ndarray:
  """A (N, H, W, 1) region mask over every channel of `images`."""
  return np.broadcast_to(mask, images.shape)


# --- Checks ------------------------------------------------------------------


def source_index(cands: dict, train: dict, salt: str | None) -> tuple[np.ndarray, str]:
  """Each candidate's source in the training split (-1: not found), and how.

  A synthetic set names its source by a salted pseudonym (of the slice, or of
  the case id with the slice index: synthesis/pipeline.py PROVENANCES); a
  real split by the case id and slice index themselves.
  """
  n = len(cands["image"])
  if "source" in cands:
    if not salt:
      return np.full(n, -1), "no salt: the pseudonyms cannot be matched"
    from dfgm_jax.synthesis import pipeline  # pylint: disable=g-import-not-at-top
    table = pipeline.source_rows(train["case_id"], train["slice_index"], salt)
    by = "salted pseudonym"
    keys = list(zip(cands["source"], cands["slice_index"]))
  elif "case_id" in cands:
    by = "case id and slice index"
    table = {k: i for i, k in enumerate(zip(train["case_id"], train["slice_index"]))}
    keys = list(zip(cands["case_id"], cands["slice_index"]))
  else:
    return np.full(n, -1), "the candidates name no source"
  return np.array([table.get(k, -1) for k in keys], np.int64), by


def region_checks(cands, heldout, train, cand_regions, held_regions,
                  s: Settings, heldout_patients=None, candidate_groups=None) -> dict:
  """memorization.region_audit per region, on the images whose region is not empty.

  heldout_patients: the held-out slices' case ids (their patients), which the
  thresholds' intervals resample; None counts every slice as a patient.
  candidate_groups: the candidates' patients (case ids of a real split,
  source pseudonyms of a synthetic set), resampled likewise; None: each
  candidate its own.
  """
  out = {}
  patients = None if heldout_patients is None else np.asarray(heldout_patients)
  groups = None if candidate_groups is None else np.asarray(candidate_groups)
  for region in AUDIT_REGIONS:
    cm, hm = cand_regions[region], held_regions[region]
    cuse = np.flatnonzero(cm.reshape(len(cm), -1).sum(1) > 0)
    huse = np.flatnonzero(hm.reshape(len(hm), -1).sum(1) > 0)
    if cuse.size == 0 or huse.size == 0:
      out[region] = {"skipped": "empty region in every candidate or held-out slice"}
      continue
    res = memorization.region_audit(
        cands[cuse], heldout[huse], train, _channels(cm[cuse], cands[cuse]),
        _channels(hm[huse], heldout[huse]),
        heldout_patients=None if patients is None else patients[huse],
        candidate_groups=None if groups is None else groups[cuse],
        n=s.carlini_n, alpha=s.carlini_alpha, max_shift=s.max_shift, flips=s.flips,
        rotations=s.rotations, quantile=s.heldout_quantile, n_bootstrap=s.n_bootstrap,
        confidence=s.confidence, copy_margin=s.copy_margin,
        min_patients=s.min_heldout_patients, seed=s.seed, chunk_q=s.chunk_q,
        chunk_r=s.chunk_r)
    # Back to indices of the whole candidate set.
    back = lambda idx: [int(cuse[i]) for i in idx]  # pylint: disable=cell-var-from-loop
    res["nn_ratio"]["flagged"] = back(res["nn_ratio"]["flagged"])
    res["copies"]["copies"] = back(res["copies"]["copies"])
    res["dcr"]["below"] = back(res["dcr"]["below"])
    res["carlini"]["below"] = back(res["carlini"]["below"])
    res["carlini"]["smallest"] = [[int(cuse[i]), v] for i, v in res["carlini"]["smallest"]]
    res["candidates"] = [int(i) for i in cuse]
    res["n_candidates"], res["n_heldout"] = int(cuse.size), int(huse.size)
    out[region] = res
  return out


def source_checks(cands, train, cand_regions, regions: dict, src: np.ndarray,
                  how: str, s: Settings) -> dict:
  """Nearest-is-source fractions and source-ring replication."""
  found = np.flatnonzero(src >= 0)
  out = {"matched_by": how, "n_candidates": int(len(src)), "n_with_source": int(found.size)}
  if found.size == 0:
    out["skipped"] = f"no candidate's source found in the training split ({how})"
    return out
  for region, res in regions.items():
    if "skipped" in res:
      continue
    nearest = dict(zip(res["candidates"], res["nearest_index"]))
    hits = [i for i in found if i in nearest]
    if hits:
      out[f"nearest_is_source_{region}"] = float(
          np.mean([nearest[i] == src[i] for i in hits]))
  ring = cand_regions["ring"]
  use = found[ring[found].reshape(found.size, -1).sum(1) > 0]
  if use.size and len(train) >= 2:
    out["ring"] = memorization.source_ring_replication(
        cands[use], _channels(ring[use], cands[use]), train, src[use],
        n_other=s.n_other, seed=s.seed, chunk_q=min(s.chunk_q, 16))
    out["ring"]["replicated"] = [int(use[i]) for i in out["ring"]["replicated"]]
  else:
    out["ring"] = {"skipped": "no candidate with a ring and a source"}
  return out


# What G2 is as G1's reference (privacy.md repeats it).
G2_AS_REFERENCE = (
    "G2, trained on the public synthetic set, whose tumors are the members' own tumor "
    "interiors pasted verbatim: it saw the members' tumors but never their rings or "
    "backgrounds. Where it learnt those tumors its reference score is lower on members, "
    "which weakens the calibrated attack, never strengthens it")
# What G2 was trained on, for its own result.
G2_TRAINED_ON = (
    "G2 did not train on the members' slices, but on the synthetic set whose tumors are "
    "the members' tumors pasted verbatim (the dilated tumor region it is scored on holds "
    "them)")
_NO_REFERENCE_G2 = (
    "no model that did not see the members' tumors: G1 and the anomalydiffusion baseline "
    "trained on the members' slices, G2 on their pasted tumors")
_NO_REFERENCE_G1 = ("no G2 export to calibrate with (the anomalydiffusion baseline trained "
                    "on the members' slices, so it cannot be the reference)")


def membership_checks(config, inputs: Inputs, train: dict, heldout: dict,
                      s: Settings) -> dict:
  """Membership inference against G1 and G2 (each when exported).

  Each model is scored on the region its loss weighed (membership.
  training_region: G1 the ring, G2 the dilated tumor). G1 also gets the
  calibrated attack with G2 as the reference (G2_AS_REFERENCE); the
  anomalydiffusion baseline's model trained on the same private split as
  G1, so it is no reference. G2 has no reference (_NO_REFERENCE_G2). The
  patient bootstrap is seeded with the audit's seed.
  """
  models = {"G1": inputs.g1_dir, "G2": inputs.g2_dir}
  if not s.membership:
    return {m: {"skipped": "membership inference turned off"} for m in models}
  from dfgm_jax.privacy import membership  # pylint: disable=g-import-not-at-top
  out, loaded = {}, {}
  for name, model_dir in models.items():
    if not _model_id(model_dir):
      out[name] = {"skipped": f"no {name} export"}
    elif name == "G1":
      from dfgm_jax.diffusion import denoiser  # pylint: disable=g-import-not-at-top
      loaded[name] = denoiser.Denoiser.load(model_dir, config)
    else:
      from dfgm_jax.synthesis import local  # pylint: disable=g-import-not-at-top
      loaded[name] = local.load_shared_model(model_dir, config)
  for name, model in loaded.items():
    reference, why = None, _NO_REFERENCE_G2
    if name == "G1":
      reference, why = loaded.get("G2"), _NO_REFERENCE_G1
      if reference is not None and (reference.r_out, reference.r_in) != (model.r_out,
                                                                          model.r_in):
        reference, why = None, (f"G2's radii ({reference.r_out}, {reference.r_in}) differ "
                                f"from G1's ({model.r_out}, {model.r_in})")
    res = membership.audit_model(model, train, heldout, reference=reference,
                                 no_reference=why, target_fpr=MEMBERSHIP_FPR,
                                 bootstrap_seed=s.seed)
    if reference is not None:
      res["calibrated"]["reference"]["about"] = G2_AS_REFERENCE
    if name == "G2":
      res["about"] = G2_TRAINED_ON
    out[name] = _plain(res)
  return {name: out[name] for name in models}


def background_check(cands: dict, manifest: dict, salt: str | None) -> dict:
  """Where each background of a synthetic set came from, through the salt.

  A synthetic example names its healthy slice by salted_hash(key, salt),
  key = "<case_id>/<z:03d>". Every slice the preprocessing wrote is hashed
  with the salt and mapped to its origin (the manifest's `slice_origins`, or
  for an older manifest its case's split: 'public' or a private patient's).
  A background found nowhere is 'unknown'. Anything but public is a leak:
  a private patient's slice published as a background.
  """
  if "healthy" not in cands:
    return {"skipped": "the candidates are a real split: they have no backgrounds"}
  if not salt:
    return {"skipped": "no salt (W/private/salt): the backgrounds cannot be matched"}
  from dfgm_jax import provenance  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import pipeline  # pylint: disable=g-import-not-at-top
  case_origin = {c["case_id"]: (provenance.PUBLIC if c.get("split") == "public"
                                else provenance.PRIVATE)
                 for c in manifest.get("cases", [])}
  origin_of = {}
  for split, entries in manifest.get("slices", {}).items():
    recorded = manifest.get("slice_origins", {}).get(split)
    for i, (case_id, z) in enumerate(entries):
      origin = recorded[i] if recorded else case_origin.get(case_id, "unknown")
      origin_of[pipeline.salted_hash(provenance.slice_key(case_id, z), salt)] = origin
  found = [origin_of.get(h, "unknown") for h in cands["healthy"]]
  n = len(found)
  counts = {o: found.count(o) for o in (*provenance.ORIGINS, "unknown")}
  not_public = n - counts[provenance.PUBLIC]
  return {"n_backgrounds": n, "n_distinct": len(set(cands["healthy"])), **counts,
          "fraction_not_public": not_public / n if n else 0.0,
          "not_public": [i for i, o in enumerate(found) if o != provenance.PUBLIC]}


def g2_sample_check(inputs: Inputs, train: dict, r_out: int, r_in: int,
                    s: Settings) -> dict:
  """ALGORITHM.md 9.6: G2's generate-mode samples should sit nearer S than the
  private training slices (nearest RMSE over the generated region D and the
  full image)."""
  local = inputs.local
  if local is None:
    return {"skipped": "no local synthesis set of G2"}
  mode = _read_summary_mode(local.data_dir)
  if mode != "anomalydiffusion":
    return {"skipped": f"the local synthesis set was made in mode {mode} (harmonise); "
                       "the test needs G2's generate mode"}
  if inputs.public is None:
    return {"skipped": "no public synthetic set S to compare with"}
  samples = _all_synthetic(local)
  public = _all_synthetic(inputs.public)
  from dfgm_jax.synthesis import masks as masks_lib  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dil = np.asarray(masks_lib.dilate(jnp.asarray((samples["mask"] > 0.5).astype(np.float32)),
                                    r_out))
  out = {"n_samples": int(len(samples["image"])), "n_private": int(len(train["image"])),
         "n_public": int(len(public["image"]))}
  kw = dict(k=1, chunk_q=s.chunk_q, chunk_r=s.chunk_r)
  for region, m in (("generated", _channels(dil, samples["image"])), ("full", None)):
    use = np.arange(len(samples["image"])) if m is None else np.flatnonzero(
        m.reshape(len(m), -1).sum(1) > 0)
    mm = None if m is None else m[use]
    dp, _ = distances.nearest(samples["image"][use], train["image"], mm, **kw)
    ds, _ = distances.nearest(samples["image"][use], public["image"], mm, **kw)
    out[region] = {"private_median": float(np.median(dp)), "public_median": float(np.median(ds)),
                   "fraction_closer_to_private": float(np.mean(dp[:, 0] < ds[:, 0]))}
  return out


def _read_summary_mode(data_dir: str) -> str | None:
  s = stage_io.read_json(os.path.join(data_dir, "summary.json"))
  return s.get("mode") if s else None


def _all_synthetic(data) -> dict:
  """Images and masks of every <center>_synthetic split of a set."""
  parts = [data.load_split(name) for name, v in sorted(data.manifest["splits"].items())
           if name.endswith("_synthetic") and v.get("num_slices")]
  if not parts:
    raise errors.UserError(f"{data.data_dir}: no <center>_synthetic split")
  return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "mask")}


def _plain(obj):
  """JSON-able copy (numpy scalars and arrays to Python)."""
  return json.loads(json.dumps(obj, default=lambda v: v.tolist() if hasattr(
      v, "tolist") else str(v)))


# --- Verdicts and summary ----------------------------------------------------


def _pct(x: float) -> str:
  return f"{100 * x:.1f} %"


# Why a synthetic set's background (most of the full image) sits nearer the
# training slices than held-out slices do: matching picked it for its likeness.
_MATCHED = (" Part of it is by construction: the background is the public healthy "
            "slice that matching chose for its likeness to the source slice; it shows no "
            "private pixel, but which public slice a patient resembles.")


def region_verdict(region: str, res: dict, synthetic: bool = False) -> tuple[str, str]:
  """(status, one line) for one region: ok, warning, copies, reference too
  small, by design, skipped.

  copies: any exact or near copy (memorization.copy_summary), whatever the
  reference. reference too small: fewer held-out patients than the
  calibration needs, so neither "ok" nor "warning" can be said. warning: DCR
  or Carlini's distance puts more candidates under the held-out threshold
  than chance allows (permutation test over patients). `synthetic`: the
  candidates are a synthetic set (its background was matched to the source
  slice, which a warning on the background or full image says).
  """
  if "skipped" in res:
    return "skipped", f"{region}: not measured ({res['skipped']})"
  dcr, nn, car, cp, ref = (res["dcr"], res["nn_ratio"], res["carlini"], res["copies"],
                           res["reference"])
  lo, hi = dcr["fraction_below_interval"]
  numbers = (f"copies {_pct(cp['fraction'])} (exact {cp['n_exact']}, nearer than "
             f"{cp['copy_margin']:g} x the nearest held-out slice {cp['n_margin']}, NN "
             f"ratio under 1:3 {cp['n_ratio']}); below the held-out "
             f"{100 * dcr['quantile']:g}th percentile of DCR ({dcr['threshold']:.4f}, "
             f"interval {dcr['threshold_low']:.4f}-{dcr['threshold_high']:.4f} over "
             f"{ref['n_patients']} held-out patients): {_pct(dcr['fraction_below'])} "
             f"(interval {_pct(lo)}-{_pct(hi)}), of Carlini's: "
             f"{_pct(car['fraction_below'])}")
  if region == "tumor":
    return "by design", ("tumor: copied by design (DFGM publishes the source tumor "
                         f"interior verbatim), so expected near its source: {numbers}")
  if cp["n"] > 0:
    return "copies", (f"{region}: COPIES, {_pct(cp['fraction'])} of the candidates are "
                      f"copies of a training image in this region (shifted, mirrored or "
                      f"turned included); {numbers}")
  if ref["too_small"]:
    return "reference too small", (
        f"{region}: REFERENCE TOO SMALL, {ref['n_patients']} held-out patients "
        f"({ref['n_heldout']} slices), at least {ref['min_patients']} are needed to "
        f"calibrate the thresholds: add held-out patients (a larger test split of the "
        f"center); no exact or NN-ratio copy was found; {numbers}")
  if dcr["exceeds"] or car["exceeds"]:
    why = _MATCHED if synthetic and region in ("full", "background") else ""
    return "warning", (f"{region}: WARNING, more candidates sit close to a training "
                       f"image than held-out slices do, beyond chance (permutation p: "
                       f"DCR {dcr['p_value']:.3f}, Carlini {car['p_value']:.3f}, "
                       f"warning under {1 - dcr['confidence']:.2f}); {numbers}.{why}")
  return "ok", (f"{region}: no sign of memorization (candidates are no closer to the "
                f"training slices than unseen real slices are); {numbers}")


def source_verdict(res: dict) -> tuple[str, str]:
  ring = res.get("ring", {})
  if "skipped" in res or "skipped" in ring:
    return "skipped", f"source ring: not measured ({res.get('skipped') or ring['skipped']})"
  numbers = (f"ring distance to own source over the median to {ring['n_other']} other "
             f"tumor slices: median {ring['ratio_median']:.3f}, replicated (under 1:3) "
             f"{_pct(ring['fraction_replicated'])}")
  if ring["fraction_replicated"] > ALERT_FRACTION:
    return "warning", f"source ring: WARNING, the ring copies its source slice's; {numbers}"
  return "ok", f"source ring: not copied from the source slice; {numbers}"


_ATTACKS = (("loss", "loss attack"), ("calibrated", "calibrated attack"))


def _attacks(res: dict) -> dict:
  """label -> result of each attack that was measured on a model."""
  return {label: res[key] for key, label in _ATTACKS
          if key in res and "skipped" not in res[key]}


def _headline_auc(a: dict) -> tuple[str, float, list]:
  """(name, value, interval) of the AUC an attack is judged by: size-matched
  when its pairs hold MIN_PATIENTS patients a side (fewer pairs make an
  interval that looks certain: all won, [1, 1]), else the plain AUC."""
  if (a.get("matched_auc") is not None and a.get("matched_auc_interval") and
      min(a["matched_member_patients"], a["matched_nonmember_patients"]) >= MIN_PATIENTS):
    return "size-matched AUC", a["matched_auc"], a["matched_auc_interval"]
  return "AUC", a["auc"], a["auc_interval"]


def _interval(iv, pct: bool = False) -> str:
  if not iv:
    return "[no interval]"
  f = _pct if pct else (lambda x: f"{x:.3f}")
  return f"[{f(iv[0])}, {f(iv[1])}]"


def _tpr_text(a: dict) -> str:
  """TPR with the false-positive rate the held-out slices actually allow."""
  n, fp = a["n_nonmembers"], a["false_positives"]
  text = (f"TPR {_pct(a['tpr_at_fpr'])} {_interval(a['tpr_interval'], True)} at "
          f"{fp} of {n} held-out slices wrongly flagged (FPR {_pct(a['fpr'])}")
  if not a["fpr_reachable"]:
    text += (f"; {_pct(a['target_fpr'])} FPR is not reachable with {n} held-out slices, "
             f"the smallest non-zero FPR is 1 of {n} = {_pct(a['min_fpr'])}")
  return text + f"; a blind score gets TPR {_pct(a['chance_tpr'])} there)"


def attack_text(label: str, a: dict) -> str:
  """One attack's numbers in a line: its AUCs with intervals, then the TPR."""
  parts = [f"AUC {a['auc']:.3f} {_interval(a['auc_interval'])}"]
  if a.get("matched_auc") is not None:
    parts.append(f"size-matched AUC {a['matched_auc']:.3f} "
                 f"{_interval(a['matched_auc_interval'])} ({a['matched_pairs']} pairs of "
                 f"{a['matched_member_patients']} training and "
                 f"{a['matched_nonmember_patients']} held-out patients, "
                 f"{_pct(a['matched_members'])} of the members matched)")
  elif "matched_pairs" in a:
    parts.append("size-matched AUC: no member has a held-out slice of its tumor size")
  return f"{label}: " + ", ".join(parts) + f", {_tpr_text(a)}"


def membership_verdict(name: str, res: dict) -> tuple[str, str]:
  """(status, line) from the stronger attack's interval, size-matched when it can be.

  Detected (status warning for G1, which is not shared; leak for G2, which
  is): some attack's interval lies above 0.5. With two attacks read, each
  interval's lower end errs at 2.5 %, so a false detection stays at 5 % at
  most. ok: every attack's interval stays below LEAK_AUC. Otherwise
  inconclusive: "not detected at this sample size"; also, whatever the
  numbers, with fewer than MIN_PATIENTS patients on a side, or when the
  tumor sizes of the two sides do not overlap (no size-matched pair) while
  size alone tells them apart: then any AUC may be size, not membership.
  """
  if "skipped" in res:
    return "skipped", f"membership {name}: not measured ({res['skipped']})"
  attacks = _attacks(res)
  heads = {label: _headline_auc(a) for label, a in attacks.items()}
  strongest = max(heads, key=lambda k: heads[k][1])
  numbers = "; ".join(attack_text(label, a) for label, a in attacks.items())
  size = res["size"]
  numbers += f"; tumor area alone: AUC {size['auc']:.3f} {_interval(size['auc_interval'])}"
  cal = res.get("calibrated", {})
  if "skipped" in cal:
    numbers += f"; no calibrated attack ({cal['skipped']})"
  loss = res["loss"]
  patients = min(loss["n_member_patients"], loss["n_nonmember_patients"])
  if patients < MIN_PATIENTS:
    return "inconclusive", (
        f"membership {name}: not detected at this sample size, too few patients to judge "
        f"({loss['n_member_patients']} training and {loss['n_nonmember_patients']} "
        f"held-out patients; a patient interval needs at least {MIN_PATIENTS} a side: add "
        f"held-out patients); {numbers}")
  size_iv = size["auc_interval"] or [0.5, 0.5]
  if heads[strongest][0] == "AUC" and not size_iv[0] <= 0.5 <= size_iv[1]:
    return "inconclusive", (
        f"membership {name}: not detected at this sample size, tumor size alone tells the "
        "training slices from the held-out ones and too few patients have tumors of like "
        f"size on both sides, so an AUC may be size, not membership; {numbers}")
  detected = [k for k, (_, _, iv) in heads.items() if iv and iv[0] > 0.5]
  if detected:
    label = max(detected, key=lambda k: heads[k][2][0])
    kind, value, iv = heads[label]
    found = (f"the {label}'s {kind} {value:.3f} has its interval {_interval(iv)} above "
             "chance")
    if name == "G2":
      return "leak", (f"membership G2: LEAK, {found}: the shared model tells the "
                      "training patients' slices from held-out ones (it trained on their "
                      f"pasted tumors, which the shared set also holds); {numbers}")
    return "warning", (f"membership {name}: DETECTED, {found}: {name} memorized its "
                       "training slices (it is not shared; the synthetic set's checks say "
                       f"whether that shows in what is); {numbers}")
  if all(iv and iv[1] < LEAK_AUC for _, _, iv in heads.values()):
    return "ok", (f"membership {name}: no membership signal, every attack's interval "
                  f"stays below AUC {LEAK_AUC}; {numbers}")
  kind, value, iv = heads[strongest]
  return "inconclusive", (
      f"membership {name}: not detected at this sample size, the {strongest}'s {kind} "
      f"{value:.3f} has the interval {_interval(iv)}, which holds both chance (0.5) and "
      f"{LEAK_AUC}; more held-out patients narrow it; {numbers}")


def g2_sample_verdict(res: dict) -> tuple[str, str]:
  if "skipped" in res:
    return "skipped", f"G2 sample test: not run ({res['skipped']})"
  g = res["generated"]
  numbers = (f"median nearest RMSE over the generated region to S {g['public_median']:.4f}, "
             f"to the private slices {g['private_median']:.4f}; closer to private "
             f"{_pct(g['fraction_closer_to_private'])}")
  if g["public_median"] <= g["private_median"]:
    return "ok", f"G2 sample test: G2's samples sit closer to S than to private data; {numbers}"
  return "warning", (f"G2 sample test: WARNING, G2's samples sit closer to the private "
                     f"slices than to S; {numbers}")


def background_verdict(res: dict) -> tuple[str, str]:
  if "skipped" in res:
    return "skipped", f"backgrounds: not checked ({res['skipped']})"
  numbers = (f"{res['public']} of {res['n_backgrounds']} backgrounds are public-origin "
             f"slices, {res['private']} private patients', {res['unknown']} not in the "
             "slices' manifest (matched through the salt)")
  if res["fraction_not_public"] > 0:
    return "leak", (f"backgrounds: LEAK, {_pct(res['fraction_not_public'])} of the "
                    f"backgrounds are not public-origin slices; {numbers}; do not share "
                    "this set")
  return "ok", f"backgrounds: every background is a public-origin slice; {numbers}"


def scan_verdict(res: dict) -> tuple[str, str]:
  n = len(res["hits"])
  if n == 0:
    return "ok", (f"shared files: clean, no case id, patient id, private path or salt in "
                  f"any form the scan decodes, and no link, in {res['files_scanned']} files "
                  f"({res['bytes_scanned']} bytes)")
  files = len({h["file"] for h in res["hits"]})
  kinds = {}
  for h in res["hits"]:
    kinds[h["kind"]] = kinds.get(h["kind"], 0) + 1
  # Links and files the scan could not read are findings too: never "clean".
  found = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
  return "leak", (f"shared files: LEAK, {n} findings ({found}) in {files} files or names "
                  "(listed in privacy.md); do not share them")


def verdicts(report: dict) -> dict:
  out = {}
  for region, res in report["regions"].items():
    out[f"region {region}"] = region_verdict(
        region, res, synthetic=report["candidates"]["kind"] == "synthetic set")
  out["source ring"] = source_verdict(report["source"])
  for name, res in report["membership"].items():
    out[f"membership {name}"] = membership_verdict(name, res)
  out["G2 sample test"] = g2_sample_verdict(report["g2_samples"])
  out["shared files"] = scan_verdict(report["scan"])
  out["backgrounds"] = background_verdict(report["backgrounds"])
  return {k: {"status": st, "text": text} for k, (st, text) in out.items()}


def overall(v: dict) -> str:
  """fail (copies or a leak), warning, not shown (a check could not be
  calibrated, or a membership attack had too little power to tell: passing
  is not shown), or pass."""
  statuses = {x["status"] for x in v.values()}
  if "leak" in statuses or "copies" in statuses:
    return "fail"
  if "warning" in statuses:
    return "warning"
  if statuses & {"reference too small", "inconclusive"}:
    return "not shown"
  return "pass"


# The numbers of one attack that the shareable summary keeps.
_ATTACK_FIELDS = ("auc", "auc_interval", "matched_auc", "matched_auc_interval",
                  "matched_pairs", "matched_member_patients", "matched_nonmember_patients",
                  "tpr_at_fpr", "tpr_interval", "fpr", "false_positives", "target_fpr",
                  "chance_tpr", "n_members", "n_nonmembers", "n_member_patients",
                  "n_nonmember_patients")


def membership_summary(res: dict) -> dict:
  """One model's shareable membership numbers: per attack, tumor size alone,
  the scored region."""
  out = {"score_region": res["settings"]["score_region"],
         "tumor_area_auc": res["size"]["auc"],
         "tumor_area_auc_interval": res["size"]["auc_interval"]}
  for key, _ in _ATTACKS:
    a = res.get(key, {})
    if "skipped" not in a:
      out[key] = {f: a[f] for f in _ATTACK_FIELDS if f in a}
  return out


def summary(report: dict) -> dict:
  """The shareable part: numbers and verdicts, no ids, no paths, no indices,
  no '/' (G2's card drops strings that look like paths)."""
  regions = {}
  for region, res in report["regions"].items():
    if "skipped" in res:
      continue
    regions[region] = {
        "dcr_median": res["dcr"]["candidate_median"],
        "dcr_heldout_median": res["dcr"]["heldout_median"],
        "dcr_threshold": res["dcr"]["threshold"],
        "dcr_threshold_interval": [res["dcr"]["threshold_low"],
                                   res["dcr"]["threshold_high"]],
        "dcr_fraction_below": res["dcr"]["fraction_below"],
        "fraction_exact_copies": res["dcr"]["fraction_zero"],
        "fraction_copies": res["copies"]["fraction"],
        "nn_ratio_fraction_flagged": res["nn_ratio"]["fraction_flagged"],
        "carlini_fraction_below": res["carlini"]["fraction_below"],
        "heldout_patients": res["reference"]["n_patients"]}
  ring = report["source"].get("ring", {})
  member = {name: membership_summary(res) for name, res in report["membership"].items()
            if "skipped" not in res}
  g2 = report["g2_samples"]
  out = {
      "format": FORMAT, "center": report["center"], "candidates": report["candidates"]["kind"],
      "n_candidates": report["candidates"]["n"], "n_training": report["n_training"],
      "n_heldout": report["n_heldout"], "overall": report["overall"],
      "regions": regions,
      "source_ring_replicated": ring.get("fraction_replicated"),
      "source_ring_ratio_median": ring.get("ratio_median"),
      "membership": member,
      "g2_sample_test": g2.get("generated") if "skipped" not in g2 else None,
      "shared_files_hits": len(report["scan"]["hits"]),
      "background_fraction_not_public": report["backgrounds"].get("fraction_not_public"),
      "verdicts": {k: v["status"] for k, v in report["verdicts"].items()},
  }
  # What was not measured is left out (its verdict says "skipped").
  return {k: v for k, v in out.items() if v is not None}


# --- Writing -----------------------------------------------------------------

_MEANINGS = [
    "How to read it (ALGORITHM.md 9; every threshold comes from the held-out test "
    "slices of the same center, measured against the same training slices):",
    "",
    "- **Distance**: aligned RMSE, the smallest over shifts of up to 2 pixels, mirrored "
    "and quarter-turned candidates (the region's mask moves with its image), so a copy "
    "moved or mirrored is still at about 0.",
    "- **Copies**: a candidate at distance 0, nearer a training image than half the "
    "nearest held-out slice is to any, or with NN ratio under 1:3; any copy is a "
    "finding.",
    "- **DCR** (distance to closest record): the threshold is the held-out 5th "
    "percentile, with a 95 % interval over resampled held-out patients; the fraction "
    "of candidates below it gets an interval from resampling held-out patients and "
    "candidate patients together; warning when it is above 5 % beyond chance "
    "(permutation test dealing held-out and candidate patients anew, p < 0.01). "
    "Fewer than 5 held-out patients: 'reference too small'.",
    "- **NN ratio** d1 over d2: much closer to one training image than to the next "
    "(under 1:3, Gu et al. 2023) marks a copy. Real unseen slices almost never are.",
    "- **Carlini's calibrated distance** d1 over (0.5 x mean of the 50 nearest): "
    "calibrated and read like DCR.",
    "- **Regions**: full image, ring (generated by G1, trained on private rings), "
    "background (public healthy slice), tumor (the private source interior, copied "
    "verbatim by design: near 0, reported, not a finding).",
    "- **Source ring**: ring distance to the candidate's own source slice over the "
    "median to 50 other tumor slices; near 1 means not copied, under 1:3 replicated.",
    "- **Membership**: each model's loss on the region it was trained on (G1 the ring, "
    "G2 the dilated tumor); lower = more likely a training slice. The calibrated attack "
    "divides by a reference model's loss on the same slice, so what is hard for any "
    "model cancels. AUC 0.5 = no better than chance. Intervals are 95 % patient "
    "bootstraps. Training and held-out slices are different patients, so the verdict "
    "reads the size-matched AUC (tumor areas within 10 %) and the tumor area alone is "
    "shown as an attack of its own. The TPR is given at the false-positive rate the "
    "held-out slices allow (with n of them, the smallest non-zero rate is 1 of n). "
    "'not detected at this sample size': the interval holds both 0.5 and 0.6, or there "
    "are fewer than 5 patients on a side.",
    "- **G2 sample test**: G2's own samples should be nearer the published set S than "
    "the private slices.",
    "- **Shared files**: every hit is a private identifier in a file meant to be "
    "shared; any hit means: do not share that file.",
]


def membership_lines(name: str, res: dict) -> list[str]:
  """privacy.md's lines of one model: what was scored, each attack, size alone."""
  if "skipped" in res:
    return [f"- {name}: skipped ({res['skipped']})"]
  loss = res["loss"]
  lines = [f"- {name}, scored on the {res['settings']['score_region']} region (the one "
           f"its loss weighed): {loss['n_members']} training slices of "
           f"{loss['n_member_patients']} patients against {loss['n_nonmembers']} held-out "
           f"slices of {loss['n_nonmember_patients']} patients."]
  if res.get("about"):
    lines.append(f"  - {res['about']}.")
  for label, a in _attacks(res).items():
    lines.append(f"  - {attack_text(label, a)}.")
  cal = res.get("calibrated", {})
  if "skipped" in cal:
    lines.append(f"  - calibrated attack: not run ({cal['skipped']}).")
  elif cal.get("reference", {}).get("about"):
    lines.append(f"  - the calibrated attack's reference is {cal['reference']['about']}.")
  size = res["size"]
  lines.append(f"  - tumor area alone as the score: AUC {size['auc']:.3f} "
               f"{_interval(size['auc_interval'])} (median area {size['member_median_area']:.0f} "
               f"px for training, {size['nonmember_median_area']:.0f} px for held-out slices; "
               "0.5: alike in size).")
  return lines


def markdown(report: dict) -> str:
  """privacy.md: verdicts first, then numbers per check and the scan's hits."""
  c = report["candidates"]
  lines = [f"# Privacy audit: {report['center']}", "",
           f"Candidates: {c['kind']} `{c['split']}` ({c['n']} slices) against "
           f"{report['n_training']} training and {report['n_heldout']} held-out slices of "
           f"{report['center']}. PRIVATE file (it lists hits of private identifiers); "
           f"`{SUMMARY_JSON}` is the shareable summary.", "",
           f"**Overall: {report['overall'].upper()}**", "", "## Verdicts", ""]
  lines += [f"- **{v['status']}**: {v['text']}" for v in report["verdicts"].values()]
  lines += ["", "## What the numbers mean", "", *_MEANINGS, "", "## Per region", "",
            "| region | held-out patients | DCR median | held-out DCR median | DCR "
            "threshold (interval) | DCR below it | copies (exact, margin, "
            "ratio) | NN ratio flagged | held-out NN flagged | Carlini below |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for region, res in report["regions"].items():
    if "skipped" in res:
      lines.append(f"| {region} | skipped: {res['skipped']} ||||||||")
      continue
    d, n, k, cp = res["dcr"], res["nn_ratio"], res["carlini"], res["copies"]
    lines.append(f"| {region} | {res['reference']['n_patients']} | "
                 f"{d['candidate_median']:.4f} | {d['heldout_median']:.4f} | "
                 f"{d['threshold']:.4f} ({d['threshold_low']:.4f}-"
                 f"{d['threshold_high']:.4f}) | {_pct(d['fraction_below'])} | "
                 f"{cp['n']} ({cp['n_exact']}, {cp['n_margin']}, {cp['n_ratio']}) | "
                 f"{_pct(n['fraction_flagged'])} | "
                 f"{_pct(n.get('heldout_fraction_flagged', 0.0))} | "
                 f"{_pct(k['fraction_below'])} |")
  copied = {r: res["copies"] for r, res in report["regions"].items()
            if "copies" in res and res["copies"]["n"] and r != "tumor"}
  for region, cp in copied.items():
    res = report["regions"][region]
    at = dict(zip(res["candidates"], zip(res["nearest_index"], res["nearest_transform"])))
    lines.append("")
    lines.append(f"Copies in {region} (candidate: training index, as what): " + ", ".join(
        f"{i}: {at[i][0]} ({at[i][1]})" for i in cp["copies"][:16]))
  src = report["source"]
  lines += ["", "## Sources", "",
            f"{src['n_with_source']} of {src['n_candidates']} candidates matched to their "
            f"source slice by {src['matched_by']}."]
  for key, value in src.items():
    if key.startswith("nearest_is_source_"):
      lines.append(f"- nearest training image is the source ({key[18:]}): {_pct(value)}")
  full = report["regions"].get("full", {})
  if "carlini" in full:
    lines += ["", "16 smallest Carlini scores (full image; candidate index: score): " +
              ", ".join(f"{i}: {v:.3f}" for i, v in full["carlini"]["smallest"])]
  lines += ["", "## Membership inference", ""]
  for name, res in report["membership"].items():
    lines += membership_lines(name, res)
  lines += ["", "## Shared files", ""]
  sc = report["scan"]
  lines.append(f"{sc['files_scanned']} files scanned ({sc['bytes_scanned']} bytes), "
               f"{len(sc['tokens'])} kinds of private identifier looked for "
               f"({sc['n_tokens']} values).")
  for h in sc["hits"]:
    enc = f", as {h['encoding']}" if h.get("encoding") else ""
    lines.append(f"- `{h['file']}` ({h['where']}{enc}): {h['kind']} `{h['matched']}`")
  if report.get("figure"):
    lines += ["", f"![closest pairs (PRIVATE: training slices)]({os.path.basename(report['figure'])})"]
  return "\n".join(lines) + "\n"


def figure(path: str, cands: np.ndarray, train: np.ndarray, res: dict, n: int,
           title: str) -> str | None:
  """The n closest candidate / training pairs (full image) with their distances."""
  if "nearest_index" not in res or n < 1:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  d = np.asarray(res["nearest_distance"])
  order = np.argsort(d, kind="stable")[:n]
  fig, axes = plt.subplots(len(order), 3, figsize=(6, 2 * len(order)), squeeze=False)
  for row, j in enumerate(order):
    c, t = res["candidates"][j], res["nearest_index"][j]
    a, b = cands[c][..., 0], train[t][..., 0]
    # The distance is aligned: the candidate as it is may be a moved copy.
    how = res.get("nearest_transform", ["as is"] * len(d))[j]
    for ax, img, name in ((axes[row, 0], a, f"candidate {c}"),
                          (axes[row, 1], b, f"training {t}"),
                          (axes[row, 2], np.abs(a - b),
                           f"|diff|; aligned RMSE {d[j]:.4f} ({how})")):
      ax.imshow(img, cmap="gray", vmin=0 if name.startswith("|") else -1, vmax=1)
      ax.set_title(name, fontsize=8)
      ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  stage_io.write_bytes(path, buf.getvalue())
  return path


# --- The run -----------------------------------------------------------------


def _identity(config, inputs: Inputs, ids: dict, s: Settings) -> dict:
  return {"center": inputs.center, "candidate_split": inputs.candidate_split,
          "data": inputs.real.manifest.get("fingerprint"), **ids,
          "g1": _model_id(inputs.g1_dir), "g2": _model_id(inputs.g2_dir),
          "local": _read_summary_mode(inputs.local.data_dir) if inputs.local else None,
          "mask": config.mask.to_dict(), "settings": dataclasses.asdict(s)}


def _candidates_record(inputs: Inputs, report: dict) -> dict:
  """The audited set for the record: folder, split, kind and the set's
  fingerprint (g2.set_fingerprint: what G2's card lists of its inputs)."""
  data = inputs.candidates
  return {"dir": os.path.abspath(data.data_dir), "split": inputs.candidate_split,
          "kind": report["candidates"]["kind"],
          "set_fingerprint": g2_lib.set_fingerprint(data.data_dir, data.manifest)}


def run(config, inputs: Inputs, out_dir: str, *, settings: Settings | None = None,
        overwrite: bool = False, progress: Callable[[str], None] = logging.info) -> dict:
  """Runs every check, writes out_dir/{privacy.json, privacy.md, summary.json,
  closest_pairs.png} and the done-record; returns privacy.json's content plus
  "paths" and "reused".

  Raises:
    errors.UserError: a missing or empty split, candidates of another size.
    errors.RunMismatch: out_dir holds an audit of another identity.
  """
  from dfgm_jax.diffusion import denoiser  # pylint: disable=g-import-not-at-top
  s = settings or Settings()
  center = inputs.center
  train = _split(inputs.real, f"{center}_train", "training slices", NoHeldOut)
  heldout = _split(inputs.real, f"{center}_test", "held-out slices", NoHeldOut)
  cands = _split(inputs.candidates, inputs.candidate_split, "candidates")
  if cands["image"].shape[1:] != train["image"].shape[1:]:
    raise errors.UserError(
        f"{inputs.candidates.data_dir}: candidates of shape {cands['image'].shape[1:]}, "
        f"the training slices are {train['image'].shape[1:]}")
  ids = {"candidates": content_id(cands), "train": content_id(train),
         "heldout": content_id(heldout)}
  identity = _identity(config, inputs, ids, s)
  paths = {k: os.path.join(out_dir, v) for k, v in (
      ("privacy.json", PRIVACY_JSON), ("privacy.md", PRIVACY_MD),
      ("summary.json (SHAREABLE)", SUMMARY_JSON))}
  record_path = os.path.join(out_dir, RECORD)
  # The audit's output folder is its own flag (--out), not the workdir.
  record = stage_io.check_done(
      record_path, identity, what="a privacy audit", overwrite=overwrite,
      remedy="Pass --overwrite to replace it, or use another --out.")
  if record is not None and all(os.path.exists(p) for p in paths.values()):
    progress(f"privacy audit: {out_dir} is done for these inputs; reusing it")
    if os.path.exists(os.path.join(out_dir, FIGURE)):
      paths["figure (private)"] = os.path.join(out_dir, FIGURE)
    return {**stage_io.read_json(paths["privacy.json"]), "paths": paths, "reused": True}
  os.makedirs(out_dir, exist_ok=True)
  # The record first, then every output of an earlier audit: a run killed from
  # here on leaves nothing that looks finished (no shareable summary.json of
  # other inputs beside no record).
  for stale in (record_path, *paths.values(), os.path.join(out_dir, FIGURE)):
    if os.path.exists(stale):
      os.remove(stale)

  r_out, r_in = denoiser.radii(config)
  c_regions = regions_of(cands["mask"], r_out, r_in)
  h_regions = regions_of(heldout["mask"], r_out, r_in)
  progress(f"privacy audit: {len(cands['image'])} candidates, {len(train['image'])} "
           f"training, {len(heldout['image'])} held-out slices of {center}")
  regions = region_checks(cands["image"], heldout["image"], train["image"], c_regions,
                          h_regions, s, heldout_patients=heldout.get("case_id"),
                          candidate_groups=cands.get("source", cands.get("case_id")))
  src, how = source_index(cands, train, inputs.salt)
  report = {
      "format": FORMAT, "center": center,
      "candidates": {"split": inputs.candidate_split, "n": int(len(cands["image"])),
                     "kind": "synthetic set" if "source" in cands else "real split"},
      "n_training": int(len(train["image"])), "n_heldout": int(len(heldout["image"])),
      "settings": dataclasses.asdict(s), "radii": {"r_out": r_out, "r_in": r_in},
      "regions": regions,
      "source": source_checks(cands["image"], train["image"], c_regions, regions, src,
                              how, s),
  }
  progress("privacy audit: membership inference")
  report["membership"] = membership_checks(config, inputs, train, heldout, s)
  report["g2_samples"] = g2_sample_check(inputs, train, r_out, r_in, s)
  tokens = scan_lib.private_tokens(inputs.real.manifest, salt=inputs.salt,
                                   paths=inputs.private_paths)
  report["scan"] = scan_lib.scan(inputs.shared, tokens, figures=inputs.figures)
  report["backgrounds"] = background_check(cands, inputs.real.manifest, inputs.salt)
  report["verdicts"] = verdicts(report)
  report["overall"] = overall(report["verdicts"])
  report["summary"] = summary(report)
  leaks = scan_lib.scan_bytes(json.dumps(report["summary"]).encode(), tokens)
  if leaks:  # never: the summary holds numbers and public names only.
    raise errors.UserError(f"privacy audit: its own summary holds {leaks[0]['kind']}; "
                           "not written")
  report = _plain(report)
  fig = figure(os.path.join(out_dir, FIGURE), cands["image"], train["image"],
               regions.get("full", {}), s.figure_pairs,
               f"{center} (PRIVATE: training slices): closest candidate-training pairs")
  if fig:
    report["figure"] = os.path.basename(fig)
    paths["figure (private)"] = fig
  stage_io.write_json(paths["privacy.json"], report)
  stage_io.write_text(paths["privacy.md"], markdown(report))
  stage_io.write_json(paths["summary.json (SHAREABLE)"], report["summary"])
  # What the record names lets G2's card take only this audit of its own
  # synthetic set (train/g2.py audit_for_card).
  stage_io.mark_done(record_path, identity, overall=report["overall"],
                     candidates=_candidates_record(inputs, report),
                     summary_sha256=g2_lib.summary_sha256(report["summary"]))
  progress(f"privacy audit: overall {report['overall']}; {paths['privacy.md']}")
  return {**report, "paths": paths, "reused": False}
