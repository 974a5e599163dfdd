"""BraTS folder -> sharded 2D slice data set (TFRecord + ArrayRecord) + manifest.

Stages, each resumable:
  1. discover cases and centers (brats.py);
  2. per case, in parallel: validate, normalise, cut slices, stage to
     `OUT/.staging/<fingerprint>/<case_id>.npz` (case_slices.py); a staged
     case is reused by a rerun;
  3. split patients per center, choose the healthy set, build both formats in
     `OUT/.build` and move them into place (builder.py);
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
import os
import re
import shutil
import tempfile
from typing import Callable

import numpy as np

from data_pipeline import brats
from data_pipeline import builder
from data_pipeline import case_slices
from data_pipeline import slices

MANIFEST = "manifest.json"
STAGING = ".staging"
BUILD = ".build"
# Bump when the slice contents change for the same config and input.
PIPELINE_VERSION = 1
PRIVATE_CENTERS_AUTO = ("CBICA", "TCIA")


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
    raise ValueError(f"centers {missing} not in the data; found {sorted(found)}")
  return chosen


def fingerprint(brats_dir: str, cases, cfg: dict) -> str:
  """Hash of the input files (names, sizes, mtimes) and the slicing config."""
  h = hashlib.sha256()
  content_cfg = {k: v for k, v in cfg.items() if k not in ("formats", "num_shards_hint")}
  h.update(json.dumps([PIPELINE_VERSION, os.path.abspath(brats_dir), content_cfg],
                      sort_keys=True, default=list).encode())
  for case in cases:
    for modality, path in sorted(case.files.items()):
      st = os.stat(path)
      h.update(f"{case.case_id}/{modality}/{os.path.basename(path)}/"
               f"{st.st_size}/{st.st_mtime_ns}/{case.center}".encode())
  return h.hexdigest()[:16]


def read_manifest(out_dir: str) -> dict | None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json_atomic(path: str, obj) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)


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
  """Patient splits per center and the healthy set.

  Args:
    metas: case_id -> staged meta (center, ...), successful cases only.
    arrays_z: case_id -> {'tumor': z list, 'healthy': z list}.
    centers: private centers that get train/test splits.
    cfg: data config.

  Returns:
    (plan, case_split): plan maps split name -> [(case_id, center, kind,
    index)] (sorted by case, then z); case_split maps case_id -> 'train',
    'test' or 'public'.
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
    for part, part_ids in (("train", train), ("test", test)):
      entries = []
      for case_id in part_ids:
        case_split[case_id] = part
        entries += [(case_id, center, "tumor", i)
                    for i in range(len(arrays_z[case_id]["tumor"]))]
      plan[split_name(center, part)] = entries

  # Healthy slices: never from test patients (BRATS_FORMAT.md 5).
  public, private = [], []
  for case_id in sorted(metas):
    split = case_split[case_id]
    if split == "test":
      continue
    pool = public if split == "public" else private
    pool += [(case_id, metas[case_id]["center"], "healthy", i)
             for i in range(len(arrays_z[case_id]["healthy"]))]
  rng = np.random.default_rng(cfg["healthy_seed"])
  cap = cfg["healthy_max"]

  def sample(pool, n):
    if n >= len(pool):
      return list(pool)
    return [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]

  if cfg["healthy_prefer_public"]:
    healthy = sample(public, cap)
    healthy += sample(private, cap - len(healthy))
  else:
    healthy = sample(public + private, cap)
  plan["healthy"] = sorted(healthy, key=lambda e: (e[0], e[3]))
  return plan, case_split


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
    BratsDataError: a bad input (on_error='raise') or a folder without cases.
    FileExistsError: out_dir holds a finished output of another input/config
      and overwrite is False.
  """
  cfg = dict(cfg)
  if cfg["on_error"] not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {cfg['on_error']!r}")
  cfg["modalities"] = list(cfg["modalities"])
  cases = brats.discover_cases(brats_dir, cfg["merge_site_numbers"])
  centers_found = brats.centers_of(cases)
  print_id = fingerprint(brats_dir, cases, cfg)
  os.makedirs(out_dir, exist_ok=True)

  existing = read_manifest(out_dir)
  if existing is not None and not overwrite:
    if existing.get("fingerprint") == print_id:
      logging.info("%s is complete for this input and config; reusing it "
                   "(--overwrite rebuilds)", out_dir)
      return existing
    raise FileExistsError(
        f"{out_dir} holds a finished preprocessing of another input or "
        "config; pass --overwrite to replace it or choose another --out_dir")
  if existing is not None:
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

  build_dir = os.path.join(out_dir, BUILD)
  shutil.rmtree(build_dir, ignore_errors=True)
  nonempty = {name: entries for name, entries in plan.items() if entries}
  channels = len(cfg["modalities"])
  description = (f"BraTS {cases[0].version} slices, modalities "
                 f"{cfg['modalities']}, {cfg['image_size']}x{cfg['image_size']}")
  for file_format in cfg["formats"]:
    logging.info("writing %s", file_format)
    builder.build(build_dir, file_format, nonempty, load_case,
                  cfg["image_size"], channels, description)
  for file_format in cfg["formats"]:
    final = os.path.join(out_dir, builder.FORMAT_DIRS[file_format])
    shutil.rmtree(final, ignore_errors=True)
    os.replace(os.path.join(build_dir, builder.FORMAT_DIRS[file_format]), final)
  shutil.rmtree(build_dir, ignore_errors=True)

  manifest = {
      "fingerprint": print_id,
      "created": started.isoformat(timespec="seconds"),
      "brats_dir": os.path.abspath(brats_dir),
      "version": cases[0].version,
      "image_size": cfg["image_size"],
      "channels": channels,
      "modalities": cfg["modalities"],
      "formats": {f: os.path.relpath(builder.dataset_dir(out_dir, f), out_dir)
                  for f in cfg["formats"]},
      "centers": {c: {"num_cases": n, "private": c in centers}
                  for c, n in centers_found.items()},
      "splits": {
          name: {"num_slices": len(entries),
                 "num_cases": len({e[0] for e in entries})}
          for name, entries in plan.items()
      },
      "cases": [
          {"case_id": cid, "center": m["center"], "split": case_split[cid],
           "grade": m["grade"], "num_tumor_slices": m["num_tumor_slices"],
           "num_healthy_slices": m["num_healthy_slices"], "norm": m["norm"]}
          for cid, m in metas.items()
      ],
      "skipped": [{"path": s["path"], "reason": s["reason"]} for s in skipped],
      "slices": {name: [[e[0], zs[e[0]][e[2]][e[3]]] for e in entries]
                 for name, entries in plan.items()},
      "config": cfg,
  }
  _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
  shutil.rmtree(staging_root, ignore_errors=True)
  return read_manifest(out_dir)  # the JSON form, as a reuse would return it.
