"""Batches of preprocessed slices from tf.data, a TF-free reader, or memory.

One entry point, `get_batches`, hides three sources behind the same output
(dicts of host-local numpy arrays, leading axis = batch):

  reader='tf'         tf.data over the TFRecord copy (tfds.builder_from_directory)
  reader='grain'      grain over the ArrayRecord copy; never imports TensorFlow
  reader='synthetic'  seeded in-memory phantom slices; needs neither TF nor
                      tfds (benchmarks, GPU hosts without the data stack)

Multi-host: each process passes its (process_index, process_count) and reads
the contiguous shard `shard_bounds(n, index, count)` of the split, so shards
are disjoint, cover the split, and are the same examples for both readers.
"""

from __future__ import annotations

from typing import Iterator

from etils import epath
import numpy as np

from data_pipeline import builder
from data_pipeline import slice_sets
from dfgm_jax import errors

READERS = ("tf", "grain", "synthetic")
FORMAT_OF_READER = {"tf": "tfrecord", "grain": "array_record"}
TEXT_FIELDS = ("key", "case_id", "center", "source", "healthy", "mode", "origin")


class SplitTooSmall(errors.UserError, ValueError):
  """An empty split, or one with fewer examples than processes to share it."""


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of shard `index` of `count` over n examples (sizes differ by <= 1)."""
  if not 0 <= index < count:
    raise ValueError(f"process index {index} not in [0, {count})")
  return (n * index) // count, (n * (index + 1)) // count


def load_manifest(data_dir: str) -> dict:
  """See slice_sets.load_manifest (kept here for the readers' callers)."""
  return slice_sets.load_manifest(data_dir)


def split_size(data_dir: str, split: str) -> int:
  """Slices in a split; slice_sets.UnknownSplit names the ones that exist."""
  return slice_sets.check_split(data_dir, split)


def _tfds_builder(data_dir: str, reader: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  file_format = FORMAT_OF_READER[reader]
  # Real slices (brats_slices) or a synthetic set (synthetic_slices).
  name = load_manifest(data_dir).get("dataset", builder.DATASET_NAME)
  path = builder.dataset_dir(data_dir, file_format, name)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"{path}: no {file_format} copy of the data set "
                            f"(config data.formats)")
  return tfds.builder_from_directory(path)


def _shard_split(data_dir, split, process_index, process_count) -> str:
  n = split_size(data_dir, split)
  if n == 0:
    raise SplitTooSmall(f"{data_dir}: split {split!r} is empty")
  start, end = shard_bounds(n, process_index, process_count)
  if start == end:
    raise SplitTooSmall(f"{data_dir}: split {split!r} has {n} examples, too "
                        f"few for {process_count} processes")
  return f"{split}[{start}:{end}]"


def _decode_text(example: dict) -> dict:
  for k in TEXT_FIELDS:
    if k in example:
      v = example[k]
      if isinstance(v, np.ndarray):
        example[k] = np.array([x.decode() if isinstance(x, bytes) else str(x)
                               for x in v.reshape(-1)]).reshape(v.shape)
      elif isinstance(v, bytes):
        example[k] = v.decode()
  return example


def _hide_gpus_from_tf(tf) -> None:
  # tf.data must not grab accelerator memory that JAX needs.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised.


def _tf_dataset(data_dir, split, process_index, process_count):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _hide_gpus_from_tf(tf)
  sharded = _shard_split(data_dir, split, process_index, process_count)
  return tf, _tfds_builder(data_dir, "tf").as_dataset(split=sharded,
                                                      shuffle_files=False)


def _grain_source(data_dir, split, process_index, process_count):
  sharded = _shard_split(data_dir, split, process_index, process_count)
  return _tfds_builder(data_dir, "grain").as_data_source(split=sharded)


def read_examples(data_dir: str, split: str, reader: str = "grain",
                  process_index: int = 0, process_count: int = 1
                  ) -> Iterator[dict]:
  """Unbatched examples of this process's shard, in stored order (one pass)."""
  if reader == "tf":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    _, ds = _tf_dataset(data_dir, split, process_index, process_count)
    for ex in tfds.as_numpy(ds):
      yield _decode_text(dict(ex))
  elif reader == "grain":
    source = _grain_source(data_dir, split, process_index, process_count)
    for i in range(len(source)):
      yield _decode_text(dict(source[i]))
  elif reader == "synthetic":
    raise ValueError("read_examples reads stored data; use get_batches for "
                     "the synthetic source")
  else:
    raise ValueError(f"unknown reader {reader!r}; expected one of {READERS}")


def get_batches(data_dir: str | None, split: str, *, batch_size: int,
                reader: str = "grain", shuffle: bool = True, seed: int = 0,
                repeat: bool = True, drop_remainder: bool = True,
                process_index: int = 0, process_count: int = 1,
                prefetch: int = 2, shuffle_buffer: int = 10_000,
                synthetic: dict | None = None) -> Iterator[dict]:
  """Host-local batches of a split.

  Args:
    data_dir: a preprocessing output (ignored for reader='synthetic').
    split: e.g. 'CBICA_train', 'CBICA_test', 'healthy'.
    batch_size: examples per batch on this process.
    reader: 'tf', 'grain' or 'synthetic'.
    shuffle: shuffle with `seed` (grain: a fresh seeded permutation per epoch;
      tf: a buffer of `shuffle_buffer`).
    seed: shuffle seed.
    repeat: loop forever over epochs.
    drop_remainder: drop a last partial batch.
    process_index, process_count: this process's shard of the split.
    prefetch: batches prepared ahead.
    shuffle_buffer: tf.data shuffle buffer size.
    synthetic: for reader='synthetic': kwargs of `synthetic_examples`
      (num_examples, image_size, channels, tumor).

  Yields:
    dict of numpy arrays: image (B,S,S,C) float32, mask/label/brain
    (B,S,S,1) uint8, slice_index (B,) int32, key/case_id/center (B,) str.
  """
  if reader == "synthetic":
    yield from _synthetic_batches(split, batch_size, shuffle, seed, repeat,
                                  drop_remainder, process_index, process_count,
                                  **(synthetic or {}))
  elif reader == "tf":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf, ds = _tf_dataset(data_dir, split, process_index, process_count)
    if shuffle:
      ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
      ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.prefetch(prefetch if prefetch else tf.data.AUTOTUNE)
    for batch in tfds.as_numpy(ds):
      yield _decode_text(dict(batch))
  elif reader == "grain":
    import grain  # pylint: disable=g-import-not-at-top
    source = _grain_source(data_dir, split, process_index, process_count)
    ds = grain.MapDataset.source(source)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if repeat:
      ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=max(prefetch, 1)))
    for batch in it:
      yield _decode_text(dict(batch))
  else:
    raise ValueError(f"unknown reader {reader!r}; expected one of {READERS}")


# --- In-memory synthetic source ------------------------------------------------


def synthetic_example(index: int, image_size: int = 128, channels: int = 1,
                      tumor: bool = True, seed: int = 0) -> dict:
  """A seeded phantom slice (ALGORITHM.md Appendix B): example `index`.

  Brain: an ellipse of intensity 0.4-0.6 plus low-frequency texture on a -1
  background; tumor: a bright irregular blob, mask = blob > 0.5.
  """
  rng = np.random.default_rng([seed, index])
  s = image_size
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
  ay, ax = rng.uniform(0.36, 0.44), rng.uniform(0.28, 0.36)
  brain = (yy / ay) ** 2 + (xx / ax) ** 2 <= 1.0
  base = rng.uniform(0.4, 0.6)
  freqs = rng.normal(size=(3, 2)) * 6
  phases = rng.uniform(0, 2 * np.pi, size=3)
  texture = sum(np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + p)
                for f, p in zip(freqs, phases)) * 0.05
  value = np.clip(base + texture, 0, 1)
  mask = np.zeros((s, s), bool)
  label = np.zeros((s, s), np.uint8)
  if tumor:
    cy, cx = rng.uniform(-0.15, 0.15, size=2)
    r = rng.uniform(0.06, 0.14)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6.3))
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (r * wobble)
    blob = np.clip(1.2 - dist, 0, 1)
    mask = (blob > 0.5) & brain
    value = np.where(mask, np.maximum(value, 0.7 + 0.3 * blob), value)
    label = np.where(mask, np.where(dist < 0.35, 1, 2), 0).astype(np.uint8)
  image = np.where(brain, 2 * value - 1, -1).astype(np.float32)
  return {
      "image": np.repeat(image[..., None], channels, axis=-1),
      "mask": mask.astype(np.uint8)[..., None],
      "label": label[..., None],
      "brain": brain.astype(np.uint8)[..., None],
      "key": f"synthetic/{index:06d}",
      "case_id": f"synthetic_{index // 5:05d}",
      "center": "SYNTHETIC",
      "slice_index": np.int32(index % 5),
  }


def _synthetic_batches(split, batch_size, shuffle, seed, repeat, drop_remainder,
                       process_index, process_count, num_examples=256,
                       image_size=128, channels=1, tumor=None):
  if tumor is None:
    tumor = split != "healthy"
  start, end = shard_bounds(num_examples, process_index, process_count)
  indices = np.arange(start, end)
  # Examples are generated once: the source then costs no CPU per step.
  cache = {}
  epoch = 0
  while True:
    order = (np.random.default_rng([seed, epoch]).permutation(indices)
             if shuffle else indices)
    stop = len(order) - (len(order) % batch_size if drop_remainder else 0)
    for b in range(0, stop, batch_size):
      items = []
      for i in order[b:b + batch_size]:
        if i not in cache:
          cache[i] = synthetic_example(int(i), image_size, channels, tumor,
                                       seed=0)
        items.append(cache[i])
      yield {k: np.stack([it[k] for it in items]) for k in items[0]}
    epoch += 1
    if not repeat:
      return
