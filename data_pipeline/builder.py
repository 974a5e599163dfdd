"""TFDS data sets of 2D slices, written as TFRecord and as ArrayRecord.

The same builder runs once per file format into its own data dir, so both
copies have identical features, keys, splits and example order: tf.data reads
the TFRecord copy, the TF-free reader the ArrayRecord one. Two data sets use
it: `brats_slices` (preprocessing) and `synthetic_slices` (synthesis).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterator

import numpy as np

from dfgm_jax import provenance

DATASET_NAME = "brats_slices"
SYNTHETIC_NAME = "synthetic_slices"
VERSION = "1.0.0"
FORMAT_DIRS = {"tfrecord": "tfrecord", "array_record": "array_record"}


def dataset_dir(out_dir: str, file_format: str, name: str = DATASET_NAME) -> str:
  """Folder of one format's TFDS data set inside an output folder."""
  return os.path.join(out_dir, FORMAT_DIRS[file_format], name, VERSION)


def _tensor(shape, dtype):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.Tensor(shape=shape, dtype=dtype)


def features(image_size: int, channels: int):
  """Features of the real slices."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  s = image_size
  return tfds.features.FeaturesDict({
      # float32 in [-1, 1], background -1, one channel per modality.
      "image": _tensor((s, s, channels), np.float32),
      # whole-tumor mask (label > 0).
      "mask": _tensor((s, s, 1), np.uint8),
      # canonical labels: 0 bg, 1 NCR/NET, 2 edema, 3 enhancing.
      "label": _tensor((s, s, 1), np.uint8),
      # brain (non-zero voxels of the input volume).
      "brain": _tensor((s, s, 1), np.uint8),
      # provenance.
      "key": tfds.features.Text(),
      "case_id": tfds.features.Text(),
      "center": tfds.features.Text(),
      "slice_index": np.int32,
      # "public" (a non-private center's volume) or "private" (a private
      # center's patient): dfgm_jax/provenance.py.
      "origin": tfds.features.Text(),
  })


def synthetic_features(image_size: int, channels: int):
  """Features of a synthetic set: no raw identifiers, only salted hashes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  s = image_size
  return tfds.features.FeaturesDict({
      "image": _tensor((s, s, channels), np.float32),
      "mask": _tensor((s, s, 1), np.uint8),  # the label of the pair: M.
      "key": tfds.features.Text(),
      # Salted hash of the tumor's source slice, or of its case id
      # (config.synthesis.provenance; synthesis/pipeline.py PROVENANCES).
      "source": tfds.features.Text(),
      "center": tfds.features.Text(),  # the tumor's center.
      "slice_index": np.int32,  # -1 unless the provenance is per patient.
      "healthy": tfds.features.Text(),  # salted hash of the healthy slice's key.
      "rank": np.int32,  # 0 = closest match.
      "mode": tfds.features.Text(),
      "model_step": np.int32,
  })


# split name -> callable returning an iterator of (key, example).
SplitGenerators = dict


@functools.cache
def _builder_class(dataset_name: str):
  """Defined lazily: tensorflow_datasets is imported only when building."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Not registered in TFDS's global registry: one class per data set name.
  class SliceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """2D slices from in-process generators, one per split."""

    VERSION = tfds.core.Version(VERSION)
    name = dataset_name

    def __init__(self, *, feature_dict, generators, description, **kwargs):
      self._feature_dict = feature_dict
      self._generators = generators
      self._description = description
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=self._description,
                                   features=self._feature_dict)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(gen)
              for name, gen in self._generators.items()}

    def _generate_examples(self, gen):
      yield from gen()

  return SliceBuilder


def build_generic(out_dir: str, file_format: str, name: str, feature_dict,
                  generators: SplitGenerators, description: str = "") -> None:
  """Writes one format of data set `name` under out_dir/<format>/."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cls = _builder_class(name)
  b = cls(feature_dict=feature_dict, generators=generators,
          description=description,
          data_dir=os.path.join(out_dir, FORMAT_DIRS[file_format]),
          file_format=file_format)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False))


def _plan_examples(entries, load_case, origin_of) -> Iterator:
  """Real-slice examples of a split plan (entries grouped by case)."""
  cached_id, arrays = None, None
  for case_id, center, kind, index in entries:
    if case_id != cached_id:
      cached_id, arrays = case_id, load_case(case_id)
    z = int(arrays[f"{kind}_z"][index])
    label = arrays[f"{kind}_label"][index][..., None]
    key = provenance.slice_key(case_id, z)
    yield key, {
        "image": arrays[f"{kind}_image"][index],
        "mask": (label > 0).astype(np.uint8),
        "label": label,
        "brain": arrays[f"{kind}_brain"][index][..., None],
        "key": key, "case_id": case_id, "center": center, "slice_index": z,
        "origin": origin_of(case_id),
    }


def plan_generators(plan: dict, load_case: Callable[[str], dict],
                    origin_of: Callable[[str], str]) -> dict:
  """split name -> callable yielding the real-slice examples of its plan.

  origin_of: case id -> the origin its slices carry ("public" or "private").
  """
  return {name: functools.partial(_plan_examples, entries, load_case, origin_of)
          for name, entries in plan.items()}
