"""Slice sets on disk: read a split into memory, write a set (JAX-free).

A slice set is a folder with `manifest.json` (written last) and one TFDS copy
of the data set per file format (`tfrecord/`, `array_record/`). Two kinds
exist: the real slices of preprocessing (`brats_slices`) and the synthetic
set of synthesis (`synthetic_slices`). This module is the data layer's one way
to
- read a manifest, with advice that fits the folder when there is none
  (`load_manifest`);
- hold a split in memory (`load_split`), for training and synthesis;
- write a set in every format, built aside and moved into place
  (`write_set`, and `SliceData.write_synthetic_set` for synthesis).

`SliceData` bundles these for the library's stages, which never import the
data layer themselves: a binary in launch/ makes one and hands it over.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterator

from etils import epath
import numpy as np

from data_pipeline import brats
from data_pipeline import builder
from dfgm_jax import disk_full
from dfgm_jax import errors
from dfgm_jax import stage_io

MANIFEST = "manifest.json"
BUILD = ".build"
# Integer fields of the two data sets, returned as lists of int.
INT_FIELDS = ("slice_index", "rank", "model_step")
# Mask-like fields, returned as float32 arrays (N, S, S, 1).
FLOAT_FIELDS = ("image", "mask", "brain")


class NoSliceSet(errors.UserError, FileNotFoundError):
  """A folder that holds no finished slice set (no manifest.json)."""


class UnknownSplit(errors.UserError, KeyError):
  """A split the slice set does not have."""

  def __str__(self):  # KeyError would quote the message.
    return str(self.args[0]) if self.args else ""


def _entries(path: epath.Path) -> list[str]:
  try:
    return sorted(p.name for p in path.iterdir())
  except Exception:  # pylint: disable=broad-except
    return []  # unreadable or a backend without listing: advise generically.


def _has(path: epath.Path) -> bool:
  try:
    return path.exists()
  except Exception:  # pylint: disable=broad-except
    return False


def _advice(data_dir: str) -> str:
  """What a folder without a manifest most likely is, and what to do about it."""
  root = epath.Path(data_dir)
  if not _has(root):
    return ("the folder does not exist (pass the output folder of "
            "launch.preprocess, or of launch.synthesize for a synthetic set)")
  names = _entries(root)
  kinds = set()
  for fmt_dir in set(builder.FORMAT_DIRS.values()):
    for base in (root, root / BUILD):
      for name in _entries(base / fmt_dir):
        kinds.add(name)
  staged = root / ".staging"
  for run in _entries(staged):
    if any(n.endswith(".npz") for n in _entries(staged / run)):
      kinds.add(builder.DATASET_NAME)  # preprocessing stages case .npz files.
  if "summary.json" in names or os.path.basename(
      os.path.normpath(data_dir)) == "synthetic":
    kinds.add(builder.SYNTHETIC_NAME)
  if builder.SYNTHETIC_NAME in kinds:
    return ("it holds a synthetic set whose synthesis did not finish "
            "(an interrupted run writes no manifest): rerun launch.synthesize "
            "with the same flags, it resumes")
  if builder.DATASET_NAME in kinds:
    return ("it holds slices whose preprocessing did not finish (an "
            "interrupted run writes no manifest): rerun launch.preprocess "
            "with the same flags, it resumes")
  if not names:
    return ("the folder is empty: neither a preprocessing output nor a "
            "synthetic set (run launch.preprocess first)")
  finished = [n for n in names if _has(root / n / MANIFEST)]
  if finished:  # e.g. the workdir instead of its slices/ folder.
    return (f"it holds finished sets in {', '.join(n + '/' for n in finished)}: "
            "pass one of those folders")
  if any(n.endswith((".nii", ".nii.gz")) for n in names) or any(
      n.startswith(("BraTS", "Brats")) or n in brats.DATA_FOLDER_NAMES.values()
      or n == brats.KAGGLE_OUTER_FOLDER for n in names):
    return ("it looks like raw BraTS data: pass it to launch.preprocess "
            "--brats_dir and its --out_dir here")
  shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
  return (f"it holds {shown}, but no tfrecord/ or array_record/ copy of a "
          "data set: not a preprocessing output nor a synthetic set")


def load_manifest(data_dir: str) -> dict:
  """The manifest of a finished slice set (a local folder or gs://...).

  Raises:
    NoSliceSet: no manifest.json; the message names the folder and says what
      it holds instead (an unfinished synthetic set, unfinished slices, raw
      data, nothing) and what to run.
  """
  # epath: a local folder or a bucket URL (gs://...), which pods read from.
  path = epath.Path(data_dir) / MANIFEST
  if not _has(path):
    raise NoSliceSet(f"{data_dir}: no manifest.json, so no finished slice set "
                     f"here; {_advice(data_dir)}")
  return json.loads(path.read_text())


def check_split(data_dir: str, split: str, manifest: dict | None = None) -> int:
  """The number of slices of `split`; UnknownSplit names the ones that exist."""
  manifest = load_manifest(data_dir) if manifest is None else manifest
  splits = manifest.get("splits", {})
  if split not in splits:
    raise UnknownSplit(f"{data_dir}: no split {split!r}; splits: "
                       f"{sorted(splits)}")
  return splits[split]["num_slices"]


def _column(name: str, values: list):
  if name in FLOAT_FIELDS:
    return np.stack(values).astype(np.float32)
  if name in INT_FIELDS:
    return [int(v) for v in values]
  if isinstance(values[0], str):
    return list(values)
  return np.stack(values)


def load_split(data_dir: str, split: str, reader: str = "grain",
               process_index: int = 0, process_count: int = 1) -> dict:
  """All examples of a split (this process's shard of it) in memory.

  The splits are small (hundreds of slices: 825 healthy at 128 x 128 are
  54 MB), so holding them lets a sampler draw any example at any step.

  Returns:
    numpy float32 `image` (N,S,S,C), `mask` and (real slices) `brain`
    (N,S,S,1); lists for the text fields (`key`, `case_id`, `center`, and a
    synthetic set's `source`, `healthy`, `mode`) and for the integer ones
    (`slice_index`, a synthetic set's `rank` and `model_step`); `label`, when
    stored, stays uint8.

  Raises:
    NoSliceSet: no finished set in `data_dir`.
    UnknownSplit: naming the split and the splits that exist.
    input_pipeline.SplitTooSmall: the split is empty, or has fewer examples
      than processes.
  """
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  manifest = load_manifest(data_dir)
  check_split(data_dir, split, manifest)
  # An empty split, or an empty shard of one, is refused by the reader.
  examples = list(input_pipeline.read_examples(data_dir, split, reader,
                                               process_index, process_count))
  return {name: _column(name, [e[name] for e in examples])
          for name in examples[0]}


def write_set(out_dir: str, dataset_name: str, feature_dict,
              splits: dict[str, Callable[[], Iterator]], formats,
              description: str = "") -> dict:
  """Writes every format of a data set, built aside then moved into place.

  Args:
    out_dir: the set's folder; each format lands in out_dir/<format>/.
    dataset_name: builder.DATASET_NAME or builder.SYNTHETIC_NAME.
    feature_dict: the TFDS features (builder.features, synthetic_features).
    splits: split name -> callable returning an iterator of (key, example);
      called once per format, so each copy holds the same examples in the
      same order.
    formats: 'tfrecord' and/or 'array_record'.
    description: stored in the data set's info.

  Returns:
    format -> the data set's folder relative to out_dir (the manifest's
    `formats`).
  """
  build_dir = os.path.join(out_dir, BUILD)
  shutil.rmtree(build_dir, ignore_errors=True)
  try:
    for file_format in formats:
      builder.build_generic(build_dir, file_format, dataset_name, feature_dict,
                            splits, description)
  except Exception as e:  # tfds wraps a full disk in a RuntimeError.
    full = disk_full.as_disk_full(e, out_dir)
    if full is None:
      raise
    shutil.rmtree(build_dir, ignore_errors=True)  # give the space back.
    raise full from e
  # Every format is complete before any is moved: a failure above leaves the
  # previous copies (if any) untouched.
  for file_format in formats:
    stage_io.replace_dir(os.path.join(build_dir, builder.FORMAT_DIRS[file_format]),
                         os.path.join(out_dir, builder.FORMAT_DIRS[file_format]))
  shutil.rmtree(build_dir, ignore_errors=True)
  return {f: os.path.relpath(builder.dataset_dir(out_dir, f, dataset_name), out_dir)
          for f in formats}


def _synthetic_examples(res: dict, mode: str, model_step: int) -> Iterator:
  for i in range(len(res["image"])):
    z = res["slice_index"][i]
    # No slice index in the key when the provenance leaves it out (z < 0).
    key = (f"{res['source'][i]}/{z:03d}/{res['rank'][i]}" if z >= 0 else
           f"{res['source'][i]}/{res['rank'][i]}")
    yield key, {"image": res["image"][i].astype(np.float32),
                "mask": res["mask"][i].astype(np.uint8), "key": key,
                "source": res["source"][i], "center": res["center"][i],
                "slice_index": res["slice_index"][i], "healthy": res["healthy"][i],
                "rank": res["rank"][i], "mode": mode, "model_step": model_step}


class SliceData:
  """A slice set for the library's stages: its manifest, splits, and writer.

  The library never imports the data layer; a binary makes a SliceData and
  passes it to the stage that reads slices or writes a synthetic set.
  """

  def __init__(self, data_dir: str, reader: str = "grain"):
    self.data_dir = data_dir
    self.reader = reader
    self._manifest = None

  @property
  def manifest(self) -> dict:
    """The set's manifest (read once); NoSliceSet when there is none."""
    if self._manifest is None:
      self._manifest = load_manifest(self.data_dir)
    return self._manifest

  def split_size(self, split: str) -> int:
    """Slices in `split`; UnknownSplit (naming those that exist) if absent."""
    return check_split(self.data_dir, split, self.manifest)

  def load_split(self, split: str, process_index: int = 0,
                 process_count: int = 1) -> dict:
    """See `load_split`."""
    return load_split(self.data_dir, split, self.reader, process_index,
                      process_count)

  def write_synthetic_set(self, out_dir: str, results: dict, *, image_size: int,
                          channels: int, mode: str, model_step: int,
                          formats) -> dict:
    """Writes the synthetic set (split <center>_synthetic) in every format.

    Args:
      out_dir: the synthetic set's folder.
      results: center -> {image, mask, source, center, slice_index, healthy,
        rank} (as synthesis.runner.collect returns); empty centers get no
        split.
      image_size, channels: example geometry.
      mode: the synthesis mode, stored with every example.
      model_step: training step of the weights, stored with every example.
      formats: 'tfrecord' and/or 'array_record'.

    Returns:
      format -> the data set's folder relative to out_dir.
    """
    splits = {
        f"{center}_synthetic": (lambda r=res: _synthetic_examples(r, mode, model_step))
        for center, res in results.items() if len(res["image"])
    }
    return write_set(out_dir, builder.SYNTHETIC_NAME,
                     builder.synthetic_features(image_size, channels), splits,
                     formats, f"DFGM synthetic slices, mode {mode}")
