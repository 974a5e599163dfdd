"""Training data for the diffusion binaries: splits -> MixedSampler.

Lives in launch/ because it wires data_pipeline (readers) to dfgm_jax (the
sampler); dfgm_jax itself never imports data_pipeline.
"""

from __future__ import annotations

import jax
import numpy as np

from dfgm_jax.train import batches


def _stack(examples) -> dict:
  if not examples:
    return {"image": np.zeros((0, 1, 1, 1), np.float32),
            "mask": np.zeros((0, 1, 1, 1), np.float32)}
  return {"image": np.stack([e["image"] for e in examples]),
          "mask": np.stack([e["mask"] for e in examples]).astype(np.float32)}


def load_split(data_dir: str, split: str, reader: str, shard: bool) -> dict:
  """All examples of a split (this process's shard when `shard`) in memory.

  The splits are small (hundreds of slices: 825 healthy at 128 x 128 are
  54 MB), so holding them lets the sampler draw any example at any step.
  """
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  index, count = (jax.process_index(), jax.process_count()) if shard else (0, 1)
  return _stack(list(input_pipeline.read_examples(data_dir, split, reader,
                                                  index, count)))


def synthetic_pools(config) -> tuple[dict, dict]:
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  s, c = config.data.image_size, len(config.data.modalities)
  healthy = [input_pipeline.synthetic_example(i, s, c, tumor=False, seed=1)
             for i in range(64)]
  tumor = [input_pipeline.synthetic_example(i, s, c, tumor=True, seed=2)
           for i in range(64)]
  return _stack(healthy), _stack(tumor)


def make_sampler(config, data_dir: str | None) -> batches.MixedSampler:
  """The host-local sampler of train.batch_size / process_count examples."""
  t = config.train
  if t.reader == "synthetic":
    healthy, tumor = synthetic_pools(config)
  else:
    if not data_dir:
      raise ValueError("--data_dir is required unless config.train.reader=synthetic")
    healthy = load_split(data_dir, "healthy", t.reader, shard=True)
    # The n_shot subset is chosen over the whole private split (same on every
    # process), then each process keeps its share of it.
    tumor = load_split(data_dir, f"{t.center}_train", t.reader, shard=False)
    keep = batches.select_n_shot(len(tumor["image"]), t.n_shot, t.sampler_seed)
    keep = np.array_split(keep, jax.process_count())[jax.process_index()]
    tumor = {k: v[keep] for k, v in tumor.items()}
  if t.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={t.batch_size} not divisible by "
                     f"{jax.process_count()} processes")
  return batches.MixedSampler(healthy, tumor, t.batch_size // jax.process_count(),
                              t.p_healthy, t.sampler_seed, jax.process_index())
