"""An institute's own NIfTI volumes -> a `healthy` split, preprocessed like G2's data.

Local synthesis (launch.synthesize_local --healthy_nifti=DIR) takes the
institute's healthy slices straight from its volumes. They are cut by the
preprocessing's own functions (case_slices.extract: volumes.load_case's
validation, volumes.normalise, slices.select_healthy_slices, the output
grid) with the `data` config G2 was trained on, and written as a normal
preprocessing output holding one split, `healthy` (preprocess.plan_splits
with no private center: healthy_max and healthy_seed apply as there).

Layouts of DIR (one of the two; both at once is refused):
  case folders  DIR/<case>/<case>_t2.nii[.gz] (BraTS 2020/2021 names) or
                DIR/<case>/<case>-t2w.nii[.gz] (BraTS 2023), at any depth,
                folder names free (a BraTS training folder is one); a
                <case>_seg / <case>-seg file beside it is its segmentation.
                Other files are ignored; with more modalities in the config,
                their files (<case>_flair ...) are read too.
  flat          DIR/<name>.nii[.gz]: one subject's T2 volume each (the case
                id is <name>, less a _t2 / -t2w suffix); DIR/<id>_seg.nii[.gz]
                (or <id>-seg) is the segmentation of subject <id>.
A volume without a segmentation is a healthy subject: every slice on the
stride grid with enough brain (healthy_min_brain_frac) qualifies. With one,
only tumor-free slices healthy_min_gap_mm away from the tumor do, as in
preprocessing. Labels follow BraTS: {0, 1, 2, 4} for _seg names, {0, 1, 2,
3} for -seg (2023) names; others are refused naming the file.

Volumes must be in BraTS space (skull-stripped, co-registered to SRI24);
one stored in another axis order than BraTS's (L, P, S) is reoriented to it
first (a private copy, removed once its slices are staged), so that axial
slices come out as in G2's data. Only the config's modalities are read
(require_all_modalities does not apply: an institute's healthy subjects
often have a T2 only).

Every bad input (unreadable, truncated, not 3D, NaN, all zero, mismatched
segmentation, no NIfTI at all) raises brats.BratsDataError naming the file.
The output is reused when a rerun finds the same volumes and config, refused
for others unless overwrite (stage_io.check_done), and a run that stops
resumes from its staged volumes.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil

import numpy as np

from data_pipeline import brats
from data_pipeline import builder
from data_pipeline import case_slices
from data_pipeline import preprocess
from data_pipeline import slice_sets
from dfgm_jax import provenance
from dfgm_jax import stage_io

HEALTHY = "healthy"
CENTER = "local"  # the center of every volume (the institute's own).
BRATS_AXES = ("L", "P", "S")  # BraTS voxel axes (BRATS_FORMAT.md 1.3).
REORIENTED = "reoriented"  # folder of reoriented copies inside the staging.
# Config fields that only make the private splits of preprocessing: they do
# not change a healthy split, so they are not part of its identity.
NOT_USED = ("centers", "test_fraction", "split_seed", "merge_site_numbers",
            "healthy_include_private", "tumor_slices_per_volume",
            "min_tumor_area_mm2", "require_all_modalities")
SEG = "seg"


def slice_config(cfg: dict) -> dict:
  """The data config as extract() takes it for an institute's volumes."""
  cfg = dict(cfg)
  cfg["modalities"] = list(cfg["modalities"])
  cfg["require_all_modalities"] = False  # only the modalities G2 uses are read.
  cfg["require_seg"] = False  # a volume without segmentation is healthy.
  return cfg


# --- Discovery -------------------------------------------------------------------


def _strip_suffix(name: str) -> str | None:
  for suffix in brats.NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return None


def _folder_case(folder: str, modalities) -> brats.Case | None:
  """The case of a folder holding <name>_<modality> (or 2023) files, else None."""
  case_id = os.path.basename(folder)
  for version in (brats.detect_version(case_id) or "2021", "2023"):
    files = {}
    for modality in tuple(modalities) + (SEG,):
      path = brats._find_nifti(folder, brats.file_stem(version, case_id, modality))  # pylint: disable=protected-access
      if path is not None:
        files[modality] = path
    if any(m in files for m in modalities):
      return brats.Case(case_id=case_id, version=version, folder=folder,
                        files=files, center=CENTER)
  return None


def _case_folders(root: str, modalities) -> list[brats.Case]:
  cases = []
  for dirpath, dirnames, _ in os.walk(root):
    dirnames.sort()
    keep = []
    for name in dirnames:
      case = _folder_case(os.path.join(dirpath, name), modalities)
      if case is None:
        keep.append(name)  # descend: case folders may be nested.
      else:
        cases.append(case)
    dirnames[:] = keep
  return cases


def _flat_cases(root: str, names: list[str], modalities) -> list[brats.Case]:
  """Subjects of a flat folder: one T2 file each, `<id>_seg` beside it."""
  if tuple(modalities) != ("t2",):
    raise brats.BratsDataError(
        root, f"a flat folder holds one T2 volume per subject, but the model "
        f"takes modalities {tuple(modalities)}: give one folder per subject "
        "with a <case>_<modality>.nii.gz file per modality")
  segs, volumes = {}, {}
  for name in names:
    stem = _strip_suffix(name)
    path = os.path.join(root, name)
    for sep in ("_", "-"):
      if stem.endswith(sep + SEG):
        segs[stem[:-len(sep + SEG)]] = (path, "2023" if sep == "-" else "2021")
        break
    else:
      case_id = stem
      for suffix in ("_t2", "-t2w"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
          case_id = stem[:-len(suffix)]
      if case_id in volumes:
        raise brats.BratsDataError(path, f"a second volume of subject {case_id!r} "
                                   f"(the first: {volumes[case_id]})")
      volumes[case_id] = path
  cases = []
  for case_id, path in sorted(volumes.items()):
    files = {"t2": path}
    seg, version = segs.pop(case_id, (None, "2021"))
    if seg is not None:
      files[SEG] = seg
    cases.append(brats.Case(case_id=case_id, version=version, folder=root,
                            files=files, center=CENTER))
  for case_id, (seg, _) in sorted(segs.items()):
    raise brats.BratsDataError(seg, f"a segmentation without its volume (expected "
                               f"{case_id}.nii.gz, {case_id}_t2.nii.gz or "
                               f"{case_id}-t2w.nii.gz beside it)")
  return cases


def discover(nifti_dir: str, modalities=("t2",)) -> list[brats.Case]:
  """The institute's volumes in either layout (module docstring), by case id.

  Raises:
    brats.BratsDataError: not a folder, no volume, both layouts at once, a
      case id twice, a segmentation without its volume.
  """
  if not os.path.isdir(nifti_dir):
    raise brats.BratsDataError(nifti_dir, "not a directory")
  flat = sorted(n for n in os.listdir(nifti_dir)
                if _strip_suffix(n) and os.path.isfile(os.path.join(nifti_dir, n)))
  folders = _case_folders(nifti_dir, modalities)
  if flat and folders:
    raise brats.BratsDataError(
        nifti_dir, f"holds both NIfTI files ({flat[0]}, ...) and case folders "
        f"({folders[0].folder}, ...): give one layout")
  if not flat and not folders:
    raise brats.BratsDataError(
        nifti_dir, "no NIfTI volume found: expected T2 files (<name>.nii.gz, "
        "optionally <name>_seg.nii.gz) or case folders <case>/<case>_t2.nii.gz")
  cases = _flat_cases(nifti_dir, flat, modalities) if flat else folders
  ids = [c.case_id for c in cases]
  twice = sorted({i for i in ids if ids.count(i) > 1})
  if twice:
    folders_of = [c.folder for c in cases if c.case_id == twice[0]]
    raise brats.BratsDataError(nifti_dir, f"case {twice[0]!r} appears more than "
                               f"once: {folders_of}")
  return sorted(cases, key=lambda c: c.case_id)


# --- Orientation -----------------------------------------------------------------


def _reorient(case: brats.Case, out_dir: str, size: int, spatial: str
              ) -> tuple[brats.Case, dict]:
  """The case with its files in BraTS axis order, and {copy: original}.

  A file already in BraTS order is used as it is. Its header is checked
  here (a readable 3D NIfTI; with spatial 'pad', slices that fit the grid).
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from data_pipeline import volumes  # pylint: disable=g-import-not-at-top
  files, copies = {}, {}
  for modality, path in case.files.items():
    img = volumes.load_header(path)
    ornt = nib.orientations.io_orientation(img.affine)
    turn = nib.orientations.ornt_transform(
        ornt, nib.orientations.axcodes2ornt(BRATS_AXES))
    shape = [img.shape[int(i)] for i in _ornt_axes(turn)]
    if spatial == "pad" and max(shape[:2]) > size:
      raise brats.BratsDataError(path, f"slices of {shape[0]}x{shape[1]} voxels do "
                                 f"not fit config.data.image_size={size} with "
                                 "spatial='pad' (use 'resize')")
    if np.array_equal(turn, [[0, 1], [1, 1], [2, 1]]):
      files[modality] = path
      continue
    data = volumes.read_data(path, img)
    moved = nib.orientations.apply_orientation(data, turn)
    affine = img.affine @ nib.orientations.inv_ornt_aff(turn, data.shape)
    header = img.header.copy()
    header.set_data_shape(moved.shape)
    header.set_data_dtype(moved.dtype)  # the values as read: no rescaling.
    folder = os.path.join(out_dir, case.case_id)
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    copy = os.path.join(folder, name)
    tmp = os.path.join(folder, f".tmp{os.getpid()}_{name}")
    # nibabel picks the format from the name, so the temporary keeps it.
    nib.save(type(img)(moved, affine, header), tmp)
    os.replace(tmp, copy)
    logging.info("%s: axes %s, reoriented to %s", path,
                 "".join(nib.aff2axcodes(img.affine)), "".join(BRATS_AXES))
    files[modality], copies[copy] = copy, path
  return brats.Case(case.case_id, case.version, case.folder, files, case.center,
                    case.grade), copies


def _ornt_axes(turn: np.ndarray) -> list[int]:
  """For each output axis of an orientation transform, the input axis."""
  order = [0] * len(turn)
  for source, (target, _) in enumerate(turn):
    order[int(target)] = source
  return order


def _stage(case: brats.Case, cfg: dict, staging_dir: str) -> dict:
  """case_slices.stage of the case in BraTS order; errors name the user's file."""
  if os.path.exists(case_slices.staged_path(staging_dir, case.case_id)):
    return case_slices.stage(case, cfg, staging_dir)  # reused as it is.
  copies_dir = os.path.join(staging_dir, REORIENTED)
  copies = {}
  try:
    turned, copies = _reorient(case, copies_dir, cfg["image_size"], cfg["spatial"])
    result = case_slices.stage(turned, cfg, staging_dir)
  except brats.BratsDataError as e:
    if cfg["on_error"] != "skip":
      raise brats.BratsDataError(copies.get(e.path, e.path), e.reason) from None
    result = {"error": {"case_id": case.case_id, "path": e.path, "reason": e.reason}}
  finally:
    shutil.rmtree(os.path.join(copies_dir, case.case_id), ignore_errors=True)
  if "error" in result:
    result["error"]["path"] = copies.get(result["error"]["path"],
                                         result["error"]["path"])
  return result


# --- The run ---------------------------------------------------------------------


def identity(nifti_dir: str, cases, cfg: dict) -> dict:
  """What defines the output: the volumes and the config fields that slice."""
  used = {k: v for k, v in cfg.items() if k not in NOT_USED}
  return {**preprocess.identity(nifti_dir, cases, used), "source": "healthy_nifti"}


def run(nifti_dir: str, out_dir: str, cfg: dict, *, overwrite: bool = False,
        progress: bool = False) -> dict:
  """Preprocesses DIR's volumes into `out_dir` (split `healthy`); the manifest.

  Args:
    nifti_dir: the institute's volumes (module docstring: layouts).
    out_dir: output folder (local synthesis: W2/private/healthy_slices).
    cfg: the `data` config section as a dict (image_size and modalities:
      G2's).
    overwrite: redo a finished output, also one of other volumes or config.
    progress: show a progress bar.

  Raises:
    errors.ConfigError: a bad `data` config value.
    brats.BratsDataError: a bad volume (naming the file), no volume, or no
      healthy slice in any of them.
    errors.RunMismatch: `out_dir` holds the slices of other volumes or
      another config (naming what differs) and overwrite is False.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  preprocess.check_config(cfg)
  cfg = slice_config(cfg)
  cases = discover(nifti_dir, cfg["modalities"])
  ident = identity(nifti_dir, cases, cfg)
  print_id = preprocess.fingerprint(nifti_dir, cases, {k: v for k, v in cfg.items()
                                                       if k not in NOT_USED})
  manifest_path = os.path.join(out_dir, preprocess.MANIFEST)
  os.makedirs(out_dir, exist_ok=True)
  done = stage_io.check_done(
      manifest_path, ident, what="healthy slices of other volumes or another config",
      overwrite=overwrite, remedy="Pass --overwrite to redo them, or use another "
      "--workdir.")
  if done is not None and done.get("fingerprint") == print_id:
    logging.info("%s holds these volumes' healthy slices; reusing them", out_dir)
    return done
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # never trust it again.

  staging_root = os.path.join(out_dir, preprocess.STAGING)
  staging_dir = os.path.join(staging_root, print_id)
  if overwrite:
    shutil.rmtree(staging_dir, ignore_errors=True)
  for name in os.listdir(staging_root) if os.path.isdir(staging_root) else []:
    if name != print_id:  # stagings of other volumes or config.
      shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
  os.makedirs(staging_dir, exist_ok=True)
  started = datetime.datetime.now(datetime.timezone.utc)
  metas, zs, skipped = {}, {}, []
  for case in tqdm(cases, desc="healthy volumes", unit="volume", disable=not progress):
    result = _stage(case, cfg, staging_dir)
    if "error" in result:
      skipped.append({"path": result["error"]["path"],
                      "reason": result["error"]["reason"]})
      logging.warning("skipped %s: %s", skipped[-1]["path"], skipped[-1]["reason"])
      continue
    metas[case.case_id] = result["meta"]
    with np.load(case_slices.staged_path(staging_dir, case.case_id)) as f:
      zs[case.case_id] = {k: f[f"{k}_z"].tolist() for k in case_slices.KINDS}
  if not metas:
    raise brats.BratsDataError(nifti_dir, "every volume was skipped as bad input")
  # No private center: every volume is in the healthy pool (healthy_max applies).
  plan, _ = preprocess.plan_splits(metas, zs, [], cfg)
  entries = plan[HEALTHY]
  if not entries:
    raise brats.BratsDataError(
        nifti_dir, f"no healthy slice in {len(metas)} volume(s): none has a "
        "tumor-free slice on the config.data.slice_stride_mm grid with "
        f"config.data.healthy_min_brain_frac={cfg['healthy_min_brain_frac']} of "
        "it brain")

  def load_case(case_id):
    return case_slices.load_staged(staging_dir, case_id)

  channels = len(cfg["modalities"])
  formats = slice_sets.write_set(
      out_dir, builder.DATASET_NAME, builder.features(cfg["image_size"], channels),
      builder.plan_generators({HEALTHY: entries}, load_case,
                              lambda _: provenance.PRIVATE), cfg["formats"],
      f"an institute's healthy slices, modalities {cfg['modalities']}, "
      f"{cfg['image_size']}x{cfg['image_size']}")
  manifest = {
      "fingerprint": print_id,
      "created": started.isoformat(timespec="seconds"),
      "nifti_dir": os.path.abspath(nifti_dir),
      "image_size": cfg["image_size"], "channels": channels,
      "modalities": cfg["modalities"], "formats": formats,
      "centers": {CENTER: {"num_cases": len(cases), "private": False}},
      # The institute's own scans: private, whatever the split is called
      # (a local synthesis set made on them is the institute's alone).
      "splits": {HEALTHY: {"num_slices": len(entries),
                           "num_cases": len({e[0] for e in entries}),
                           "origins": {provenance.PUBLIC: 0,
                                       provenance.PRIVATE: len(entries)}}},
      "cases": [{"case_id": c.case_id, "split": "public",
                 "segmentation": SEG in c.files,
                 "num_healthy_slices": metas[c.case_id]["num_healthy_slices"],
                 "norm": metas[c.case_id]["norm"]}
                for c in cases if c.case_id in metas],
      "skipped": skipped,
      "slices": {HEALTHY: [[e[0], zs[e[0]]["healthy"][e[3]]] for e in entries]},
      "slice_origins": {HEALTHY: [provenance.PRIVATE] * len(entries)},
      "config": cfg,
      "identity": stage_io.normalise(ident),
  }
  stage_io.write_json(manifest_path, manifest)  # last: the output is complete.
  shutil.rmtree(staging_root, ignore_errors=True)
  return stage_io.read_json(manifest_path)
