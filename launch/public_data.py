"""G2's public training data and its train-and-export run (launch.train_g2, the pipeline).

The synthetic sets of all centers (every <center>_synthetic split of each
given set: the tumor examples) plus the public `healthy` split of a
preprocessing output, as one MixedSampler. The guard (train/g2.py
check_public) sees every split before any slice is read, and the batches
come only from the splits it passed.

Lives in launch/ because it wires the data layer (readers, manifests) to the
library (the sampler, G2's trainer); dfgm_jax never imports data_pipeline.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from dfgm_jax import errors
from dfgm_jax.train import batches
from dfgm_jax.train import g2 as g2_lib


def public_inputs(healthy_dir: str, synthetic_dirs) -> list[g2_lib.PublicInput]:
  """Every split G2 trains on: each synthetic set's splits, then `healthy`; guarded."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  synthetic_dirs = [d for d in synthetic_dirs if d]
  if not synthetic_dirs:
    raise errors.ConfigError("G2 needs at least one synthetic set (--synthetic_dir)")
  inputs = []
  for d in synthetic_dirs:
    manifest = slice_sets.load_manifest(d)
    # Every split of a set: a private one among them is refused, not skipped.
    inputs += [g2_lib.PublicInput("tumor", d, manifest, s)
               for s in sorted(manifest.get("splits", {}))]
  inputs.append(g2_lib.PublicInput("healthy", healthy_dir,
                                   slice_sets.load_manifest(healthy_dir),
                                   g2_lib.HEALTHY))
  g2_lib.check_public(inputs)
  return inputs


def _check_geometry(config, inp: g2_lib.PublicInput) -> None:
  size, channels = config.data.image_size, len(config.data.modalities)
  m = inp.manifest
  if m.get("image_size", size) != size or m.get("channels", channels) != channels:
    raise errors.ConfigError(
        f"config.data.image_size={size}, {channels} modalities: {inp.where} holds "
        f"{m.get('image_size')}px slices of {m.get('channels')} channels")


def load(config, healthy_dir: str, synthetic_dirs
         ) -> tuple[list, list[dict], batches.MixedSampler]:
  """(inputs, their descriptions for the card, this process's MixedSampler)."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  reader = config.train.reader
  if reader == "synthetic":
    raise errors.ConfigError("config.train.reader=synthetic: G2 trains on the "
                             "synthetic sets and the healthy split; use grain or tf")
  inputs = public_inputs(healthy_dir, synthetic_dirs)
  described, pools = [], {"tumor": [], "healthy": []}
  for inp in inputs:
    _check_geometry(config, inp)
    arrays = slice_sets.load_split(inp.where, inp.split, reader)
    arrays = {"image": arrays["image"], "mask": arrays["mask"]}
    described.append(g2_lib.describe(inp, g2_lib.set_fingerprint(inp.where, inp.manifest),
                                     g2_lib.content_sha256(arrays)))
    pools[inp.role].append(arrays)
  # Whole splits are read (their content hash is the card's), then each
  # process keeps its share, as train_data does for the private split.
  index, count = jax.process_index(), jax.process_count()
  pool = {}
  for role, parts in pools.items():
    stacked = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "mask")}
    keep = np.array_split(np.arange(len(stacked["image"])), count)[index]
    pool[role] = {k: v[keep] for k, v in stacked.items()}
  t = config.train
  if t.batch_size % count:
    raise errors.ConfigError(f"config.train.batch_size={t.batch_size}: not divisible "
                             f"by the {count} processes")
  sampler = batches.MixedSampler(pool["healthy"], pool["tumor"], t.batch_size // count,
                                 t.p_healthy, t.sampler_seed, index)
  return inputs, described, sampler


def train_and_export(config, workdir: str, out_dir: str, healthy_dir: str,
                     synthetic_dirs, *, privacy_json: str | None = None,
                     overwrite: bool = False, stop_at: int | None = None,
                     progress: bool = True) -> dict:
  """Trains G2 (resumed when started) in `workdir` and exports it with its card.

  After a run that was not preempted, the export follows the training: a
  finished export of this G2 at the trained step is kept, card and audit
  included (only its card changes, for a new finished audit given as
  `privacy_json`); one of an earlier step is replaced. An export of another
  model at `out_dir` is refused unless `overwrite`.

  Returns:
    step, preempted, metrics, compile_s and (unless preempted) export, card.
  """
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  inputs, described, sampler = load(config, healthy_dir, synthetic_dirs)
  result = g2_lib.train(config, workdir, inputs, described, sampler.batch,
                        overwrite=overwrite, stop_at=stop_at, progress=progress)
  out = {"step": result["step"], "preempted": result["preempted"],
         "metrics": result["metrics"], "compile_s": result["compile_s"],
         "tumor slices": sum(d["num_slices"] for d in described if d["role"] == "tumor"),
         "healthy slices": sum(d["num_slices"] for d in described
                               if d["role"] == "healthy")}
  if result["preempted"] or jax.process_index() != 0:
    return out
  export, _ = g2_lib.export(config, workdir, out_dir, privacy_json=privacy_json,
                            overwrite=overwrite, step=result["step"])
  return {**out, "export": export, "card": os.path.join(export, model_io.MODEL_CARD)}
