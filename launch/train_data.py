"""Training data for the diffusion binaries: splits -> MixedSampler.

Lives in launch/ because it wires data_pipeline (readers) to dfgm_jax (the
sampler); dfgm_jax itself never imports data_pipeline.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from dfgm_jax import errors
from dfgm_jax.train import batches


def _stack(examples) -> dict:
  return {"image": np.stack([e["image"] for e in examples]),
          "mask": np.stack([e["mask"] for e in examples]).astype(np.float32)}


def load_split(data_dir: str, split: str, reader: str, shard: bool,
               fields: tuple[str, ...] = ("image", "mask")) -> dict:
  """`fields` of a split (this process's shard when `shard`) in memory."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  index, count = (jax.process_index(), jax.process_count()) if shard else (0, 1)
  arrays = slice_sets.load_split(data_dir, split, reader, index, count)
  return {name: arrays[name] for name in fields}


def load_healthy(config, data_dir: str, shard: bool) -> dict:
  """The `healthy` split, refused with what to change when it is empty.

  It is empty when the data has no volume of a non-private center (e.g. a
  BraTS 2021/2023 folder, one private center): preprocessing puts no private
  patient's slice in it unless asked to.
  """
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax import provenance  # pylint: disable=g-import-not-at-top
  split = slice_sets.load_manifest(data_dir).get("splits", {}).get(provenance.HEALTHY, {})
  if not split.get("num_slices"):
    raise errors.ConfigError(
        f"{data_dir}: its {provenance.HEALTHY!r} split is empty (no volume of a "
        "non-private center); add public volumes, leave a center public "
        "(config.data.centers), or preprocess with "
        f"{provenance.RESEARCH_SWITCH}=True (research only: synthetic sets are then "
        "not shareable)")
  return load_split(data_dir, provenance.HEALTHY, config.train.reader, shard=shard)


def check_slices(config, data_dir: str) -> None:
  """Refuses slices whose size or modalities differ from config.data's.

  The network is built for config.data.image_size and its channels; slices
  of another size would train a model that only synthesis would refuse.
  """
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  manifest = slice_sets.load_manifest(data_dir)
  size = config.data.image_size
  if manifest.get("image_size", size) != size:
    raise errors.ConfigError(
        f"config.data.image_size={size}: the slices in {data_dir} are "
        f"{manifest['image_size']} x {manifest['image_size']}; set "
        f"--config.data.image_size={manifest['image_size']} or preprocess "
        f"again with image_size={size}")
  modalities = list(config.data.modalities)
  stored = manifest.get("modalities", modalities)
  if list(stored) != modalities:
    raise errors.ConfigError(
        f"config.data.modalities={tuple(modalities)}: the slices in {data_dir} "
        f"hold {tuple(stored)}; set --config.data.modalities to match or "
        "preprocess again")


def check_dp_public_pool(config, data_dir: str) -> None:
  """Refuses DP-SGD when the healthy split is not all public-origin.

  DP-SGD leaves the healthy examples unclipped and unnoised: they must not
  be any patient's private data. Preprocessing puts only public-origin slices
  in `healthy` by default; with data.healthy_include_private (research) the
  split holds private patients' slices, which the patient-level epsilon
  would not cover, so DP refuses rather than report an epsilon that is not
  true for them.
  """
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax import provenance  # pylint: disable=g-import-not-at-top
  manifest = slice_sets.load_manifest(data_dir)
  origins = provenance.split_origins(manifest, provenance.HEALTHY)
  if not provenance.all_public(origins):
    raise errors.ConfigError(
        f"config.dp.enabled=True: the {provenance.HEALTHY!r} split of {data_dir} "
        f"holds {provenance.describe(origins)}; DP-SGD uses the healthy slices "
        "unclipped, so they must all be public-origin (preprocess with "
        f"{provenance.RESEARCH_SWITCH}=False, the default, or train without DP)")


def synthetic_pools(config, client_index: int = 0) -> tuple[dict, dict]:
  """Random healthy and tumor pools; each client gets its own tumor pool."""
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  s, c = config.data.image_size, len(config.data.modalities)
  healthy = [input_pipeline.synthetic_example(i, s, c, tumor=False, seed=1)
             for i in range(64)]
  tumor = [input_pipeline.synthetic_example(i, s, c, tumor=True,
                                            seed=2 + client_index)
           for i in range(64)]
  return _stack(healthy), _stack(tumor)


def _pools(config, data_dir: str | None, fields=("image", "mask")):
  """(healthy, tumor, keep): the public healthy slices (this process's shard),
  the whole private split of train.center and its n_shot subset `keep`
  (None: the synthetic reader's random pools, used whole)."""
  t = config.train
  if t.reader == "synthetic":
    healthy, tumor = synthetic_pools(config)
    return healthy, tumor, None
  if not data_dir:
    raise errors.ConfigError("--data_dir is required unless "
                             "config.train.reader=synthetic")
  check_slices(config, data_dir)
  healthy = load_healthy(config, data_dir, shard=True)
  # The n_shot subset is chosen over the whole private split (same on every
  # process).
  tumor = load_split(data_dir, f"{t.center}_train", t.reader, shard=False, fields=fields)
  return healthy, tumor, batches.select_n_shot(len(tumor["image"]), t.n_shot,
                                               t.sampler_seed)


def data_fingerprint(config, data_dir: str, tumor: dict, keep) -> dict:
  """What G1 learns from, in a run's identity (its run.json).

  The private n_shot slices by content (a few images: cheap), the public
  healthy pool by its split record (slice and case counts), so that a
  finished run continued on other slices is refused.

  Args:
    config: train.center names the private split.
    data_dir: the slice set (its manifest is read).
    tumor: the center's whole private split (image, mask arrays).
    keep: the indices of the n_shot subset within it.
  """
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax import provenance  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for name in ("image", "mask"):
    h.update(np.ascontiguousarray(np.asarray(tumor[name])[keep]).tobytes())
  split = f"{config.train.center}_train"
  healthy = slice_sets.load_manifest(data_dir)["splits"][provenance.HEALTHY]
  return {
      "private": f"{split}: {len(keep)} of {len(tumor['image'])} slices, "
                 f"sha256 {h.hexdigest()[:16]}",
      "public": f"{provenance.HEALTHY}: {healthy.get('num_slices')} slices of "
                f"{healthy.get('num_cases')} cases",
  }


def make_dp_sampler(config, data_dir: str | None):
  """DP-SGD batches (config.dp): the whole private split, with its patients.

  Every process holds the whole n_shot subset (the Poisson draw of units is
  global); the synthetic reader's slices are one patient each.
  """
  from dfgm_jax.train import dp  # pylint: disable=g-import-not-at-top
  if config.train.reader != "synthetic" and data_dir:
    check_dp_public_pool(config, data_dir)
  healthy, tumor, keep = _pools(config, data_dir, ("image", "mask", "case_id"))
  ids = fingerprint = None
  if keep is not None:
    fingerprint = data_fingerprint(config, data_dir, tumor, keep)
    ids = [tumor["case_id"][i] for i in keep]
    tumor = {k: tumor[k][keep] for k in ("image", "mask")}
  sampler = dp.make_sampler(config, healthy, tumor, ids)
  sampler.data_fingerprint = fingerprint  # read by diffusion.train.
  return sampler


def refuse_an_unread_data_dir(config, data_dir: str | None) -> None:
  """A binary's --data_dir with config.train.reader=synthetic, which reads none.

  The synthetic reader draws random batches of the right shapes; without
  this, a user's slices would be silently ignored (configs/tiny.py sets it).
  """
  if data_dir and config.train.reader == "synthetic":
    raise errors.ConfigError(
        f"--data_dir={data_dir}: config.train.reader=synthetic reads no data "
        "(random batches of the right shapes); pass --config.train.reader=grain "
        "(or tf) to train on these slices, or leave --data_dir out")


def make_sampler(config, data_dir: str | None) -> batches.MixedSampler:
  """The host-local sampler of train.batch_size / process_count examples.

  With config.dp.enabled, the DP sampler instead (make_dp_sampler).
  """
  t = config.train
  if "dp" in config and config.dp.enabled:
    return make_dp_sampler(config, data_dir)
  healthy, tumor, keep = _pools(config, data_dir)
  fingerprint = None
  if keep is not None:  # each process keeps its share of the n_shot subset.
    fingerprint = data_fingerprint(config, data_dir, tumor, keep)
    keep = np.array_split(keep, jax.process_count())[jax.process_index()]
    tumor = {k: v[keep] for k, v in tumor.items()}
  if t.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={t.batch_size} not divisible by "
                     f"{jax.process_count()} processes")
  sampler = batches.MixedSampler(healthy, tumor, t.batch_size // jax.process_count(),
                                 t.p_healthy, t.sampler_seed, jax.process_index())
  sampler.data_fingerprint = fingerprint  # read by diffusion.train.
  return sampler


# --- Federated clients -------------------------------------------------------------


def client_centers(config, data_dir: str | None) -> list[str]:
  """The clients' centers: config.fed.centers, else the slices' private ones.

  Raises:
    errors.ConfigError: a named center without a <center>_train split, or
      (synthetic reader) no centers named anywhere.
  """
  named = [c.strip() for c in config.fed.centers.split(",") if c.strip()]
  if config.train.reader == "synthetic":
    if not named:
      named = [c.strip() for c in config.data.centers.split(",") if c.strip()]
      if named in (["auto"], ["all"]):
        raise errors.ConfigError(
            "config.fed.centers='': the synthetic reader has no slices to "
            "take the private centers from; name them, e.g. "
            "--config.fed.centers=CBICA,TCIA")
    return named
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  manifest = slice_sets.load_manifest(data_dir)
  splits = manifest.get("splits", {})
  if not named:
    named = [c for c, info in manifest.get("centers", {}).items()
             if info.get("private") and f"{c}_train" in splits]
    if not named:
      raise errors.ConfigError(f"config.fed.centers='': {data_dir} has no "
                               "private center with a <center>_train split")
  missing = [c for c in named if f"{c}_train" not in splits]
  if missing:
    known = sorted(s[:-len("_train")] for s in splits if s.endswith("_train"))
    raise errors.ConfigError(
        f"config.fed.centers={','.join(named)}: no tumor slices of {missing} "
        f"in {data_dir}; its centers: {known}")
  return named


def make_clients(config, data_dir: str | None) -> list:
  """The in-job engine's clients: one sampler per center, the healthy set shared.

  Client i draws from its center's <center>_train split (the n_shot subset,
  train.n_shot) and the public healthy split, with sampler seed
  train.sampler_seed + i: client 0 draws the batches central training on
  its center would. One process holds every client's data. With
  config.dp.enabled each client's sampler is the DP one over its center's
  patients (make_client).
  """
  t = config.train
  centers = client_centers(config, data_dir)
  if t.reader != "synthetic":
    if not data_dir:
      raise errors.ConfigError("--data_dir is required unless "
                               "config.train.reader=synthetic")
    check_slices(config, data_dir)
    healthy = load_healthy(config, data_dir, shard=False)
  return [make_client(config, data_dir, center, i,
                      None if t.reader == "synthetic" else healthy)
          for i, center in enumerate(centers)]


def make_client(config, data_dir: str | None, center: str, client_index: int,
                healthy: dict | None = None):
  """One client: `center`'s n_shot tumor slices and the healthy set, sampler
  seed train.sampler_seed + client_index (the RNG's client index).

  make_clients builds every client in one process; a Flower ClientApp builds
  only its own site's (launch/flower_app), with the same batches.
  healthy: the healthy split when already loaded (else read here).
  With config.dp.enabled the client's sampler is dp.PoissonSampler over the
  center's n_shot slices grouped by patient (case_id; the synthetic reader's
  slices are one patient each), in this one process.
  """
  from dfgm_jax.train import federated  # pylint: disable=g-import-not-at-top
  t = config.train
  use_dp = "dp" in config and config.dp.enabled
  if t.reader == "synthetic":
    healthy, tumor = synthetic_pools(config, client_index)
  else:
    if use_dp:
      check_dp_public_pool(config, data_dir)
    if healthy is None:
      check_slices(config, data_dir)
      healthy = load_healthy(config, data_dir, shard=False)
    fields = ("image", "mask", "case_id") if use_dp else ("image", "mask")
    tumor = load_split(data_dir, f"{center}_train", t.reader, shard=False,
                       fields=fields)
  keep = batches.select_n_shot(len(tumor["image"]), t.n_shot, t.sampler_seed)
  if use_dp:
    from dfgm_jax.train import dp  # pylint: disable=g-import-not-at-top
    ids = None if "case_id" not in tumor else [tumor["case_id"][i] for i in keep]
    tumor = {k: tumor[k][keep] for k in ("image", "mask")}
    groups = dp.unit_groups(config.dp.unit, len(keep), ids)
    sampler = dp.PoissonSampler(healthy, tumor, groups,
                                dp.plan_sampling(config, len(groups)),
                                t.sampler_seed + client_index)
    return federated.Client(center, sampler.batch, len(keep),
                            sampler.dp_sampling)
  tumor = {k: v[keep] for k, v in tumor.items()}
  sampler = batches.MixedSampler(healthy, tumor, t.batch_size, t.p_healthy,
                                 t.sampler_seed + client_index)
  return federated.Client(center, sampler.batch, len(keep))
