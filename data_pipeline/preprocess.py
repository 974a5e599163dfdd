"""BraTS folder -> sharded 2D slice data set (TFRecord + ArrayRecord) + manifest.

Stages, each resumable:
  0. check the `data` config (check_config) before any I/O;
  1. discover cases and centers (brats.py); a finished output of the same
     input and config is reused, one of another is refused naming the fields
     that differ (its `identity`, through stage_io);
  2. per case, in parallel: validate every required file, normalise, cut
     slices, stage to `OUT/.staging/<fingerprint>/<case_id>.npz`
     (case_slices.py); a staged case is reused by a rerun;
  3. split patients per center, choose the healthy set, build both formats in
     `OUT/.build` and move them into place (slice_sets.write_set);
  4. write `OUT/manifest.json` last (atomic rename). Readers only trust an
     output that has a manifest, so an interrupted run never looks complete.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import logging
import multiprocessing
import numbers
import os
import re
import shutil
from typing import Callable

import numpy as np

from data_pipeline import brats
from data_pipeline import builder
from data_pipeline import case_slices
from data_pipeline import slice_sets
from data_pipeline import slices
from dfgm_jax import errors
from dfgm_jax import provenance
from dfgm_jax import stage_io

MANIFEST = slice_sets.MANIFEST
STAGING = ".staging"
BUILD = slice_sets.BUILD
# Bump when the slice contents change for the same config and input.
# 2: the healthy split holds public-origin slices only; origins recorded.
PIPELINE_VERSION = 2
PRIVATE_CENTERS_AUTO = ("CBICA", "TCIA")
SPATIAL = ("resize", "pad")
ON_ERROR = ("raise", "skip")


class PreprocessMismatch(errors.RunMismatch, FileExistsError):
  """out_dir holds a finished preprocessing of another input or config."""


def _bad(field: str, value, must: str) -> errors.ConfigError:
  return errors.ConfigError(f"config.data.{field}={value!r}: {must}")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_config(cfg: dict) -> None:
  """Refuses a bad `data` section before any I/O (errors.ConfigError).

  One line per problem, naming the field, the value and what is allowed; the
  first bad field is reported.
  """
  size = cfg.get("image_size")
  if not _is_int(size) or size <= 0:
    raise _bad("image_size", size, "must be a positive integer (pixels of "
               "the square output slices, e.g. 128)")
  modalities = cfg.get("modalities")
  if isinstance(modalities, str) or not modalities:
    raise _bad("modalities", modalities, "must be a non-empty tuple of "
               f"modality names from {brats.MODALITIES}")
  for name in modalities:
    if name not in brats.MODALITIES:
      raise _bad("modalities", tuple(modalities), f"unknown modality {name!r}; "
                 f"allowed: {brats.MODALITIES} (BraTS 2023's t1n, t1c, t2w, "
                 "t2f are read under these names)")
  if len(set(modalities)) != len(modalities):
    raise _bad("modalities", tuple(modalities), "lists a modality twice")
  if cfg.get("spatial") not in SPATIAL:
    raise _bad("spatial", cfg.get("spatial"), f"must be one of {SPATIAL}")
  if cfg.get("on_error") not in ON_ERROR:
    raise _bad("on_error", cfg.get("on_error"), f"must be one of {ON_ERROR}")
  formats = cfg.get("formats")
  if (isinstance(formats, str) or not formats
      or any(f not in builder.FORMAT_DIRS for f in formats)):
    raise _bad("formats", formats, "must be a non-empty tuple of "
               f"{tuple(builder.FORMAT_DIRS)}")
  centers = cfg.get("centers")
  if not isinstance(centers, str) or not centers.strip(" ,"):
    raise _bad("centers", centers, "must be 'auto', 'all' or comma-separated "
               "center names")
  fraction = cfg.get("test_fraction")
  if not _is_number(fraction) or not 0 <= fraction < 1:
    raise _bad("test_fraction", fraction, "must be a number in [0, 1)")
  lo_hi = cfg.get("norm_percentiles")
  if (isinstance(lo_hi, str) or len(lo_hi) != 2
      or not all(_is_number(p) for p in lo_hi)
      or not 0 <= lo_hi[0] < lo_hi[1] <= 100):
    raise _bad("norm_percentiles", lo_hi, "must be two percentiles "
               "0 <= lo < hi <= 100")
  for field in ("slice_stride_mm", "healthy_min_gap_mm"):
    if not _is_number(cfg.get(field)) or cfg[field] <= 0:
      raise _bad(field, cfg.get(field), "must be a positive length in mm")
  for field in ("min_tumor_area_mm2", "healthy_stride_mm"):
    if not _is_number(cfg.get(field)) or cfg[field] < 0:
      raise _bad(field, cfg.get(field), "must be an area >= 0 in mm^2")
  if not _is_number(cfg.get("healthy_min_brain_frac")) or not (
      0 <= cfg["healthy_min_brain_frac"] <= 1):
    raise _bad("healthy_min_brain_frac", cfg.get("healthy_min_brain_frac"),
               "must be a fraction in [0, 1]")
  for field in ("tumor_slices_per_volume", "healthy_slices_per_volume",
                "healthy_max"):
    if not _is_int(cfg.get(field)) or cfg[field] < 0:
      raise _bad(field, cfg.get(field), "must be an integer >= 0")


def split_name(center: str, part: str) -> str:
  return re.sub(r"\W", "_", center) + "_" + part


def resolve_centers(spec: str, found: dict) -> list[str]:
  """The centers that get train/test splits (see configs/data.py `centers`)."""
  if spec == "all":
    return sorted(found)
  if spec == "auto":
    chosen = [c for c in PRIVATE_CENTERS_AUTO if c in found]
    return chosen or sorted(found)
  chosen = [c.strip() for c in spec.split(",") if c.strip()]
  missing = [c for c in chosen if c not in found]
  if missing:
    raise errors.ConfigError(
        f"config.data.centers={spec!r}: centers {missing} not in the data; "
        f"found {sorted(found)} (use 'auto': CBICA and TCIA when present, "
        "else every center)")
  return chosen


def fingerprint(brats_dir: str, cases, cfg: dict) -> str:
  """Hash of the input files (names, sizes, mtimes) and the slicing config."""
  h = hashlib.sha256()
  content_cfg = {k: v for k, v in cfg.items() if k not in ("formats", "num_shards_hint")}
  # Not the folder's path: a moved or copied folder (times kept) is the same input.
  del brats_dir
  h.update(json.dumps([PIPELINE_VERSION, content_cfg],
                      sort_keys=True, default=list).encode())
  for case in cases:
    for modality, path in sorted(case.files.items()):
      st = os.stat(path)
      h.update(f"{case.case_id}/{modality}/{os.path.basename(path)}/"
               f"{st.st_size}/{st.st_mtime_ns}/{case.center}".encode())
  return h.hexdigest()[:16]


def identity(brats_dir: str, cases, cfg: dict) -> dict:
  """What defines a preprocessing output, field by field (for messages).

  The same information as `fingerprint`, kept apart so that a refusal can
  say which config field or which input differs.
  """
  files = hashlib.sha256()
  for case in cases:
    for modality, path in sorted(case.files.items()):
      st = os.stat(path)
      files.update(f"{case.case_id}/{modality}/{os.path.basename(path)}/"
                   f"{st.st_size}/{st.st_mtime_ns}/{case.center}".encode())
  del brats_dir  # the files define the input, not where they are (see fingerprint).
  return {"pipeline_version": PIPELINE_VERSION,
          "input_files": f"{len(cases)} cases, sha256 {files.hexdigest()[:16]}",
          "config": {k: v for k, v in cfg.items()
                     if k not in ("formats", "num_shards_hint")}}


# Folders above a case folder searched for the phantom's marks (the phantom's
# data folder nests at most this deep below the folder holding its record).
_SOURCE_DEPTH = 4


def data_source(brats_dir: str, cases) -> dict:
  """{"kind": "phantom" | "real"}: whether the input is the phantom.

  Phantom when the folder holding a case folder, or one above it, holds the
  phantom's marker (brats.PHANTOM_MARKER) or its stage record
  (phantom_done.json, for phantoms made before the marker); else real.
  """
  marks = (brats.PHANTOM_MARKER, "phantom_done.json")
  folders = {os.path.dirname(os.path.abspath(c.folder)) for c in cases}
  folders.add(os.path.abspath(brats_dir))
  for folder in folders:
    for _ in range(_SOURCE_DEPTH):
      if any(os.path.exists(os.path.join(folder, m)) for m in marks):
        return {"kind": "phantom"}
      parent = os.path.dirname(folder)
      if parent == folder:
        break
      folder = parent
  return {"kind": "real"}


def read_manifest(out_dir: str) -> dict | None:
  return stage_io.read_json(os.path.join(out_dir, MANIFEST))


def _check_existing(out_dir: str, print_id: str, ident: dict,
                    overwrite: bool) -> dict | None:
  """A finished output of this input and config (reuse it), or None."""
  path = os.path.join(out_dir, MANIFEST)
  existing = stage_io.read_json(path)
  if existing is None or overwrite:
    return None
  if existing.get("fingerprint") == print_id:
    return existing
  remedy = "Pass --overwrite to replace it, or choose another --out_dir."
  if "identity" not in existing:  # written before manifests named their identity.
    raise PreprocessMismatch(
        f"{out_dir} holds a finished preprocessing of another input or "
        f"config. {remedy}")
  recorded = {k: v for k, v in existing["identity"].items() if k != "brats_dir"}
  if not stage_io.differences(recorded, stage_io.normalise(ident)):
    return existing  # the same input, recorded with its folder's path (older runs).
  try:
    stage_io.check_done(path, ident, what="a preprocessing", remedy=remedy)
  except errors.RunMismatch as e:
    raise PreprocessMismatch(str(e)) from None
  # Same fields, another fingerprint: only the hash's details differ.
  raise PreprocessMismatch(f"{out_dir} holds a finished preprocessing of "
                           f"another input or config. {remedy}")


def _run_cases(cases, cfg, staging_dir, num_workers, progress,
               on_case_done) -> dict:
  """Stages every case; returns case_id -> stage() result."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  results = {}
  bar = tqdm(total=len(cases), desc="preprocess", unit="case",
             disable=not progress)

  def done(case, result):
    results[case.case_id] = result
    bar.update(1)
    if on_case_done is not None:
      on_case_done(case.case_id, result)

  try:
    if num_workers <= 1:
      for case in cases:
        done(case, case_slices.stage(case, cfg, staging_dir))
    else:
      # spawn: workers never inherit a TensorFlow/JAX runtime from the parent.
      ctx = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        futures = {pool.submit(case_slices.stage, case, cfg, staging_dir): case
                   for case in cases}
        try:
          for future in concurrent.futures.as_completed(futures):
            done(futures[future], future.result())
        except BaseException:
          for future in futures:
            future.cancel()
          raise
  finally:
    bar.close()
  return results


def plan_splits(metas: dict, arrays_z: dict, centers: list[str], cfg: dict):
  """Patient splits per center and the healthy sets.

  Args:
    metas: case_id -> staged meta (center, ...), successful cases only.
    arrays_z: case_id -> {'tumor': z list, 'healthy': z list}.
    centers: private centers that get train/test splits.
    cfg: data config.

  Returns:
    (plan, case_split): plan maps split name -> [(case_id, center, kind,
    index)] (sorted by case, then z); case_split maps case_id -> 'train',
    'test' or 'public'. Splits: <center>_train / <center>_test; `healthy`,
    public-origin slices only unless cfg['healthy_include_private'] (then
    filled up to healthy_max from private training patients); and each
    private center's own <center>_healthy (its training patients' healthy
    slices, private), and its <center>_test_healthy: the tumor-free slices
    of its TEST patients (the same per-volume selection as every healthy
    slice; all of them, healthy_max caps banks, not this), private, for the
    evaluation's false-positive measure only: never a bank, never training.
    A slice's origin is its case's split (`origin_of`).
  """
  plan, case_split = {}, {}
  by_center = {}
  for case_id, meta in metas.items():
    by_center.setdefault(meta["center"], []).append(case_id)
  for center, ids in by_center.items():
    if center not in centers:
      for case_id in ids:
        case_split[case_id] = "public"
      continue
    train, test = slices.split_patients(ids, cfg["test_fraction"],
                                        cfg["split_seed"], center)
    shortfall = slices.split_shortfall(center, len(ids), cfg["test_fraction"])
    if shortfall:
      logging.warning("%s", shortfall)
    for part, part_ids in (("train", train), ("test", test)):
      entries = []
      for case_id in part_ids:
        case_split[case_id] = part
        entries += [(case_id, center, "tumor", i)
                    for i in range(len(arrays_z[case_id]["tumor"]))]
      plan[split_name(center, part)] = entries

  # Healthy slices: never from test patients (BRATS_FORMAT.md 5); those of
  # the test patients form the evaluation's own <center>_test_healthy.
  public, private_by_center = [], {}
  test_by_center = {c: [] for c in by_center if c in centers}
  for case_id in sorted(metas):
    split = case_split[case_id]
    if split == "test":
      test_by_center[metas[case_id]["center"]] += [
          (case_id, metas[case_id]["center"], "healthy", i)
          for i in range(len(arrays_z[case_id]["healthy"]))]
      continue
    center = metas[case_id]["center"]
    pool = public if split == "public" else private_by_center.setdefault(center, [])
    pool += [(case_id, center, "healthy", i)
             for i in range(len(arrays_z[case_id]["healthy"]))]
  cap = cfg["healthy_max"]

  def sample(rng, pool, n):
    if n >= len(pool):
      return list(pool)
    return [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]

  def by_case(entries):
    return sorted(entries, key=lambda e: (e[0], e[3]))

  rng = np.random.default_rng(cfg["healthy_seed"])
  healthy = sample(rng, public, cap)
  if cfg.get("healthy_include_private", False):
    private = by_case(e for pool in private_by_center.values() for e in pool)
    healthy += sample(rng, private, cap - len(healthy))
  plan["healthy"] = by_case(healthy)
  for center, pool in sorted(private_by_center.items()):
    # Its own stream, so that the public selection above does not depend on it.
    own = np.random.default_rng([cfg["healthy_seed"], *center.encode()])
    plan[split_name(center, "healthy")] = by_case(sample(own, pool, cap))
  for center, entries in sorted(test_by_center.items()):
    plan[split_name(center, provenance.TEST_HEALTHY)] = by_case(entries)
  return plan, case_split


def origin_of(case_split: str) -> str:
  """A slice's origin from its case's split: a private center's patient or not."""
  return provenance.PUBLIC if case_split == "public" else provenance.PRIVATE


def healthy_report(plan: dict, case_split: dict, arrays_z: dict, cfg: dict) -> dict:
  """The manifest's `healthy`: what the public bank holds against what was asked.

  Logs a warning when fewer public-origin slices exist than healthy_max: the
  split holds those there are, never filled up silently from private patients.
  """
  entries = plan["healthy"]
  volumes = [c for c, split in case_split.items() if split == "public"]
  available = sum(len(arrays_z[c]["healthy"]) for c in volumes)
  counts = {o: sum(1 for e in entries if origin_of(case_split[e[0]]) == o)
            for o in provenance.ORIGINS}
  report = {"asked": cfg["healthy_max"], "num_slices": len(entries), **counts,
            "public_available": available, "public_volumes": len(volumes),
            "include_private": bool(cfg.get("healthy_include_private", False))}
  if counts[provenance.PRIVATE]:
    logging.warning("healthy split: %d of %d slices are private patients' (%s=True); "
                    "synthetic sets made on it are not shareable",
                    counts[provenance.PRIVATE], len(entries),
                    provenance.RESEARCH_SWITCH)
  elif not entries:
    logging.warning("healthy split: EMPTY, no volume of a non-private center has "
                    "healthy slices; add public volumes, leave a center public "
                    "(config.data.centers), or set %s=True (research: synthetic sets "
                    "made on it are not shareable)", provenance.RESEARCH_SWITCH)
  elif len(entries) < cfg["healthy_max"]:
    logging.warning("healthy split: only %d public-origin slices (from %d public "
                    "volumes) for healthy_max=%d; going on with them", len(entries),
                    len(volumes), cfg["healthy_max"])
  return report


def run(brats_dir: str, out_dir: str, cfg: dict, *, num_workers: int = 1,
        overwrite: bool = False, progress: bool = True,
        on_case_done: Callable[[str, dict], None] | None = None) -> dict:
  """Preprocesses a BraTS folder into `out_dir`; returns the manifest.

  Args:
    brats_dir: BraTS 2020 / 2021 / 2023 training data in any layout.
    out_dir: output folder.
    cfg: the `data` config section as a dict (configs/data.py).
    num_workers: processes for the per-case work.
    overwrite: rebuild even when a finished output exists.
    progress: show a progress bar.
    on_case_done: called in this process after each case with
      (case_id, result); result has 'reused' or 'error'.

  Raises:
    errors.ConfigError: a bad value in `cfg` (before any I/O), or centers
      that are not in the data.
    BratsDataError: a bad input (on_error='raise') or a folder without cases.
    PreprocessMismatch (a FileExistsError and errors.RunMismatch): out_dir
      holds a finished output of another input/config and overwrite is False;
      the message names what differs.
  """
  check_config(cfg)
  cfg = dict(cfg)
  cfg["modalities"] = list(cfg["modalities"])
  cases = brats.discover_cases(brats_dir, cfg["merge_site_numbers"])
  centers_found = brats.centers_of(cases)
  print_id = fingerprint(brats_dir, cases, cfg)
  ident = identity(brats_dir, cases, cfg)
  os.makedirs(out_dir, exist_ok=True)

  existing = _check_existing(out_dir, print_id, ident, overwrite)
  if existing is not None:
    logging.info("%s is complete for this input and config; reusing it "
                 "(--overwrite rebuilds)", out_dir)
    return existing
  if os.path.exists(os.path.join(out_dir, MANIFEST)):
    os.remove(os.path.join(out_dir, MANIFEST))  # never trust it again.

  centers = resolve_centers(cfg["centers"], centers_found)
  logging.info("%d cases, centers %s; private: %s", len(cases), centers_found,
               centers)

  staging_root = os.path.join(out_dir, STAGING)
  staging_dir = os.path.join(staging_root, print_id)
  if overwrite and os.path.isdir(staging_dir):
    shutil.rmtree(staging_dir)
  if os.path.isdir(staging_root):  # stale stagings of other configs.
    for name in os.listdir(staging_root):
      if name != print_id:
        shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
  os.makedirs(staging_dir, exist_ok=True)
  started = datetime.datetime.now(datetime.timezone.utc)
  results = _run_cases(cases, cfg, staging_dir, num_workers, progress,
                       on_case_done)

  skipped, metas, zs = [], {}, {}
  for case in cases:
    result = results[case.case_id]
    if "error" in result:
      skipped.append(result["error"])
      logging.warning("skipped %s: %s", result["error"]["path"],
                      result["error"]["reason"])
      continue
    metas[case.case_id] = result["meta"]
  if not metas:
    raise brats.BratsDataError(brats_dir, "every case was skipped as bad input")
  arrays_cache = {}

  def load_case(case_id):
    if case_id not in arrays_cache:
      arrays_cache.clear()
      arrays_cache[case_id] = case_slices.load_staged(staging_dir, case_id)
    return arrays_cache[case_id]

  for case_id in metas:
    with np.load(case_slices.staged_path(staging_dir, case_id)) as f:
      zs[case_id] = {k: f[f"{k}_z"].tolist() for k in case_slices.KINDS}
  plan, case_split = plan_splits(metas, zs, centers, cfg)

  nonempty = {name: entries for name, entries in plan.items() if entries}
  channels = len(cfg["modalities"])
  description = (f"BraTS {cases[0].version} slices, modalities "
                 f"{cfg['modalities']}, {cfg['image_size']}x{cfg['image_size']}")
  logging.info("writing %s", ", ".join(cfg["formats"]))
  formats = slice_sets.write_set(
      out_dir, builder.DATASET_NAME,
      builder.features(cfg["image_size"], channels),
      builder.plan_generators(nonempty, load_case,
                              lambda case_id: origin_of(case_split[case_id])),
      cfg["formats"], description)

  manifest = {
      "fingerprint": print_id,
      "created": started.isoformat(timespec="seconds"),
      "brats_dir": os.path.abspath(brats_dir),
      "version": cases[0].version,
      # phantom or real (an older manifest has none: unknown to the readers).
      "source": data_source(brats_dir, cases),
      "image_size": cfg["image_size"],
      "channels": channels,
      "modalities": cfg["modalities"],
      "formats": formats,
      "centers": {c: {"num_cases": n, "private": c in centers}
                  for c, n in centers_found.items()},
      "splits": {
          name: {"num_slices": len(entries),
                 "num_cases": len({e[0] for e in entries}),
                 "origins": {o: sum(1 for e in entries
                                    if origin_of(case_split[e[0]]) == o)
                             for o in provenance.ORIGINS}}
          for name, entries in plan.items()
      },
      "healthy": healthy_report(plan, case_split, zs, cfg),
      "cases": [
          {"case_id": cid, "center": m["center"], "split": case_split[cid],
           "grade": m["grade"], "num_tumor_slices": m["num_tumor_slices"],
           "num_healthy_slices": m["num_healthy_slices"], "norm": m["norm"]}
          for cid, m in metas.items()
      ],
      "skipped": [{"path": s["path"], "reason": s["reason"]} for s in skipped],
      "slices": {name: [[e[0], zs[e[0]][e[2]][e[3]]] for e in entries]
                 for name, entries in plan.items()},
      # Per slice, aligned with `slices`: public (a non-private center's
      # volume) or private (a private center's training or test patient).
      "slice_origins": {name: [origin_of(case_split[e[0]]) for e in entries]
                        for name, entries in plan.items()},
      "config": cfg,
      # Every required file (all four modalities with require_all_modalities,
      # and seg) was read to its end and checked finite and not all zero.
      "validated": {"voxels_read": sorted(set(
          (brats.MODALITIES if cfg["require_all_modalities"]
           else tuple(cfg["modalities"])) + ("seg",)))},
      "identity": stage_io.normalise(ident),
  }
  # Written last: readers trust only an output with a manifest.
  stage_io.write_json(os.path.join(out_dir, MANIFEST), manifest)
  shutil.rmtree(staging_root, ignore_errors=True)
  return read_manifest(out_dir)  # the JSON form, as a reuse would return it.
