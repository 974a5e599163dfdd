"""TFDS data set of 2D slices, written as TFRecord and as ArrayRecord.

The same builder runs once per file format into its own data dir, so both
copies have identical features, keys, splits and example order: tf.data reads
the TFRecord copy, the TF-free reader the ArrayRecord one.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

import numpy as np

DATASET_NAME = "brats_slices"
VERSION = "1.0.0"
FORMAT_DIRS = {"tfrecord": "tfrecord", "array_record": "array_record"}

# One entry of a split plan: (case_id, kind, index in the staged arrays).
Entry = tuple


def dataset_dir(out_dir: str, file_format: str) -> str:
  """Folder of one format's TFDS data set inside a preprocessing output."""
  return os.path.join(out_dir, FORMAT_DIRS[file_format], DATASET_NAME, VERSION)


def features(image_size: int, channels: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  s = image_size
  return tfds.features.FeaturesDict({
      # float32 in [-1, 1], background -1, one channel per modality.
      "image": tfds.features.Tensor(shape=(s, s, channels), dtype=np.float32),
      # whole-tumor mask (label > 0).
      "mask": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
      # canonical labels: 0 bg, 1 NCR/NET, 2 edema, 3 enhancing.
      "label": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
      # brain (non-zero voxels of the input volume).
      "brain": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
      # provenance.
      "key": tfds.features.Text(),
      "case_id": tfds.features.Text(),
      "center": tfds.features.Text(),
      "slice_index": np.int32,
  })


@functools.cache
def _builder_class():
  """Defined lazily: tensorflow_datasets is imported only when building."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class BratsSlices(tfds.core.GeneratorBasedBuilder):
    """2D BraTS slices (private tumor slices per center, public healthy)."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, plan, load_case, image_size, channels, description,
                 **kwargs):
      self._plan = plan
      self._load_case = load_case
      self._image_size = image_size
      self._channels = channels
      self._description = description
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=self._description,
          features=features(self._image_size, self._channels))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(entries)
              for name, entries in self._plan.items()}

    def _generate_examples(self, entries):
      cached_id, arrays = None, None
      for case_id, center, kind, index in entries:
        if case_id != cached_id:  # entries are grouped by case.
          cached_id, arrays = case_id, self._load_case(case_id)
        z = int(arrays[f"{kind}_z"][index])
        label = arrays[f"{kind}_label"][index][..., None]
        key = f"{case_id}/{z:03d}"
        yield key, {
            "image": arrays[f"{kind}_image"][index],
            "mask": (label > 0).astype(np.uint8),
            "label": label,
            "brain": arrays[f"{kind}_brain"][index][..., None],
            "key": key, "case_id": case_id, "center": center,
            "slice_index": z,
        }

  return BratsSlices


def build(out_dir: str, file_format: str, plan: dict,
          load_case: Callable[[str], dict], image_size: int, channels: int,
          description: str = "") -> None:
  """Writes one format of the data set under `out_dir`.

  Args:
    out_dir: root of the format folders (a temporary folder while building).
    file_format: 'tfrecord' or 'array_record'.
    plan: split name -> list of (case_id, center, kind, index), non-empty.
    load_case: case_id -> staged arrays.
    image_size, channels: example geometry.
    description: stored in the data set's info.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cls = _builder_class()
  builder = cls(plan=plan, load_case=load_case, image_size=image_size,
                channels=channels, description=description,
                data_dir=os.path.join(out_dir, FORMAT_DIRS[file_format]),
                file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP,
      try_download_gcs=False))


def split_names(out_dir: str) -> Iterable[str]:
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, "manifest.json")) as f:
    return [n for n, s in json.load(f)["splits"].items() if s["num_slices"]]
