"""Loss-based membership inference against a diffusion model (ALGORITHM.md 9.5).

A model that memorized its training slices denoises them better than slices
it never saw. The attack (Carlini et al. 2023, section on MIA) scores every
slice by the model's own training loss and predicts "member" for a low one:

  s(x) = mean over t in TIMESTEPS and fixed noise seeds of the region-masked
         epsilon-MSE || m * (eps - eps_theta(x_t, t, ...)) ||^2 / |m|

with x_t = q_sample(x, t, eps), the network given exactly the inputs of its
training step (class 1 = tumor slice, its conditioning region of the tumor
mask, the tumor mask) and m the region the model was trained on
(training_region: G1's ring, G2's dilated tumor): a model can only have
memorized the pixels its loss weighed.

The calibrated attack (offline LiRA style) divides each slice's score by a
reference model's score of the same slice on the same pixels: what is hard
to denoise for any model (a large, textured tumor, a bright ring) cancels,
and what is left is how much better the target does on that slice. It
needs a reference that did not train on the members.

  TIMESTEPS        the four timesteps of ALGORITHM.md (on a 1000-step grid).
  training_region  the region a model's loss weighed (the score's default).
  example_noise    the fixed noise of each slice, timestep and seed.
  scores           (N,) scores of a split, jitted and batched, deterministic.
  audit_model      the loss attack, the calibrated attack (with a reference),
                   tumor size as a baseline, with patient-bootstrap intervals
                   (privacy/attack_stats.py), and the settings used.

Members = the model's training slices, non-members = the same center's
held-out test slices (other patients). AUC about 0.5 means the score does
not tell them apart; clearly above 0.5 means the model memorized members.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfgm_jax import errors
from dfgm_jax.diffusion import loss as loss_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.privacy import attack_stats
from dfgm_jax.synthesis import masks

# ALGORITHM.md 9.5, on the 1000-step grid of the default schedule
# (configs/diffusion.py); a model with T steps gets round(t * T / 1000).
TIMESTEPS = (50, 100, 200, 400)
REFERENCE_STEPS = 1000
SEEDS = (0, 1)
# The score's region for an export that does not record its loss region:
# the ring every DFGM model is trained on by default (configs/diffusion.py).
SCORE_REGION = "ring"
TARGET_FPR = 0.01


def training_region(model) -> str:
  """The region the model's loss weighed (its export's train.loss_region),
  the ring when the export does not say."""
  return model.loss_region or SCORE_REGION


def model_timesteps(num_steps: int, timesteps: Sequence[int] = TIMESTEPS,
                    reference_steps: int = REFERENCE_STEPS) -> tuple[int, ...]:
  """The timesteps on a T-step schedule: round(t * T / reference_steps).

  The same noise levels (as a fraction of the chain) whatever T: the tiny
  test models have T = 100, the real ones T = 1000 (identity).

  Raises:
    errors.UserError: an empty list or a timestep outside [0, reference_steps).
  """
  timesteps = tuple(int(t) for t in timesteps)
  if not timesteps:
    raise errors.UserError("membership scores: no timesteps given")
  bad = [t for t in timesteps if not 0 <= t < reference_steps]
  if bad:
    raise errors.UserError(
        f"membership scores: timesteps {bad} outside [0, {reference_steps})")
  return tuple(min(num_steps - 1, int(round(t * num_steps / reference_steps)))
               for t in timesteps)


def _check_split(model, split: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, masks) of a split, checked against the model's geometry."""
  for key in ("image", "mask"):
    if key not in split:
      raise errors.UserError(f"{name}: no {key!r} in the split (keys: "
                             f"{sorted(split)})")
  images = np.asarray(split["image"], np.float32)
  tumor = (np.asarray(split["mask"]) != 0).astype(np.float32)
  size = int(model.config.data.image_size)
  channels = len(model.config.data.modalities)
  if images.ndim != 4 or images.shape[1:] != (size, size, channels):
    raise errors.UserError(
        f"{name}: images of shape {images.shape[1:]} but the model "
        f"({model.source}) takes ({size}, {size}, {channels})")
  if tumor.shape != images.shape[:3] + (1,):
    raise errors.UserError(f"{name}: masks of shape {tumor.shape} do not match "
                           f"the images' {images.shape}")
  if images.shape[0] == 0:
    raise errors.UserError(f"{name}: the split is empty")
  return images, tumor


def example_noise(seed, t, index, shape) -> jax.Array:
  """(B, *shape) noise eps of the examples `index` (their places in the split).

  key(seed) folded with t, then with each example's index, never its batch
  slot: the same slice, timestep and seed always get the same noise.
  """
  base = jax.random.fold_in(jax.random.key(seed), t)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(index))
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "regions"))
def _batch_loss(graphdef, regions, params, rest, sched, x0, tumor, index, t, seed):
  """(B,) region-masked eps-MSE of one batch at one timestep and noise seed.

  The noise of each example is example_noise's, never a function of its
  position in a batch, so scores do not depend on the batch size. t, seed,
  the weights and the schedule are traced and the network static: one
  compile per architecture and batch shape, shared by every model, timestep
  and seed.

  Args:
    graphdef, rest: the model's nnx graph and non-parameter state.
    regions: (cond_region, score_region, r_out, r_in).
    params: the EMA weights; sched: the model's schedule tables.
    x0: (B,S,S,C) slices; tumor: (B,S,S,1) {0,1}; index: (B,) int32.
    t, seed: scalars.
  """
  cond_region, score_region, r_out, r_in = regions
  noise = example_noise(seed, t, index, x0.shape[1:])
  b = x0.shape[0]
  t_vec = jnp.full((b,), t, jnp.int32)
  x_t = schedule_lib.q_sample(sched, x0, t_vec, noise)
  # The inputs of train/diffusion.py's loss_fn for a tumor example: class 1,
  # the model's conditioning region of the tumor mask, the tumor mask (no
  # augmentation, no dropout).
  cond = masks.region(tumor, cond_region, r_out, r_in)
  network = nnx.merge(graphdef, params, rest)
  eps_hat = network(x_t, t_vec, jnp.ones((b,), jnp.int32), cond, tumor)
  weight = masks.region(tumor, score_region, r_out, r_in)
  return loss_lib.masked_mse(noise, eps_hat, weight)


def scores(model, split: dict, *, timesteps=TIMESTEPS, seeds=SEEDS,
           batch_size: int = 32, reference_steps: int = REFERENCE_STEPS,
           score_region: str | None = None, name: str = "split") -> np.ndarray:
  """(N,) membership score of each slice of `split` under `model`; lower = member.

  Args:
    model: a denoiser.Denoiser (Denoiser.load, or G2 through
      synthesis.local.load_shared_model): its network, EMA weights, schedule,
      radii and conditioning region (model.region) are used.
    split: a SliceData.load_split dict: `image` (N,S,S,C) in [-1, 1] and
      `mask` (N,S,S,1) tumor masks; every slice needs a non-empty region.
    timesteps: on a reference_steps grid (scaled to the model's T).
    seeds: noise seeds; the score is the mean over timesteps x seeds.
    batch_size: slices per network call; the last (or only) batch is
      padded (one compile) and the scores do not depend on it.
    reference_steps: the grid `timesteps` are given on.
    score_region: the masks.region the MSE is taken on; None: the model's
      training_region.
    name: the split's name, for messages.

  Returns:
    float64 (N,) scores, deterministic for given seeds.

  Raises:
    errors.UserError: a split that does not fit the model, a slice with an
      empty region (no tumor), bad timesteps or batch size.
  """
  images, tumor = _check_split(model, split, name)
  score_region = score_region or training_region(model)
  if int(batch_size) < 1:
    raise errors.ConfigError(f"membership scores: batch_size={batch_size}: must be >= 1")
  seeds = tuple(int(s) for s in seeds)
  if not seeds:
    raise errors.UserError("membership scores: no noise seeds given")
  ts = model_timesteps(model.schedule.num_steps, timesteps, reference_steps)
  weight = np.asarray(masks.region(jnp.asarray(tumor), score_region, model.r_out,
                                   model.r_in))
  empty = np.flatnonzero(weight.reshape(len(weight), -1).sum(axis=1) == 0)
  if empty.size:
    # masked_mse would score them 0: the surest "member" of all.
    raise errors.UserError(
        f"{name}: {empty.size} slices have an empty {score_region} (no tumor; "
        f"first: index {int(empty[0])}); membership inference scores tumor "
        "slices only")

  n = images.shape[0]
  # Always batch_size slices per call (small splits padded): one compile
  # for both splits of an audit and for every model of one architecture.
  b = int(batch_size)
  regions = (model.region, score_region, int(model.r_out), int(model.r_in))
  sched = model.schedule
  total = np.zeros(n, np.float64)
  for start in range(0, n, b):
    idx = np.arange(start, min(start + b, n))
    # Pad with repeats of the last slice: same shapes, one compile.
    padded = np.concatenate([idx, np.full(b - idx.size, idx[-1])])
    x0, m = jnp.asarray(images[padded]), jnp.asarray(tumor[padded])
    index = jnp.asarray(padded, jnp.int32)
    for t in ts:
      for seed in seeds:
        out = _batch_loss(model.graphdef, regions, model.params, model.rest, sched,
                          x0, m, index, jnp.int32(t), jnp.uint32(seed))
        total[idx] += np.asarray(out, np.float64)[:idx.size]
  return total / (len(ts) * len(seeds))


def _patients_and_areas(split: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Each slice's patient (its case id) and tumor area in pixels."""
  if "case_id" not in split:
    raise errors.UserError(
        f"{name}: no 'case_id' in the split (keys: {sorted(split)}); the intervals "
        "resample patients, so each slice must name its patient")
  area = (np.asarray(split["mask"]) != 0).reshape(len(split["mask"]), -1).sum(axis=1)
  return np.asarray(split["case_id"]).astype(str), area.astype(np.float64)


def describe(model) -> dict:
  """What identifies a model in a result: source, id, step, regions, radii."""
  return {"source": str(model.source), "model_id": model.model_id,
          "step": int(model.step), "cond_region": model.region,
          "loss_region": model.loss_region, "r_out": int(model.r_out),
          "r_in": int(model.r_in)}


def audit_model(model, members: dict, nonmembers: dict, *, reference=None,
                no_reference: str = "no reference model given",
                target_fpr: float = TARGET_FPR, n_boot: int = attack_stats.N_BOOT,
                bootstrap_seed: int = 0, **kw) -> dict:
  """The attacks on one model: scores of both splits, statistics, settings.

  Args:
    model: the Denoiser (G1, or G2 as synthesis.local.SharedModel).
    members: its training slices (a load_split dict with `case_id`).
    nonmembers: the same center's held-out test slices (with `case_id`).
    reference: a Denoiser that did not train on the members, for the
      calibrated attack: its scores of the same slices on the target's
      region (its own conditioning), with the same radii. None: the
      calibrated attack is skipped, `no_reference` says why.
    target_fpr: the FPR the TPR is asked at (the reached one is reported).
    n_boot, bootstrap_seed: the patient bootstrap of every interval.
    **kw: scores()'s keyword arguments (timesteps, seeds, batch_size,
      score_region: default the model's training_region).

  Returns (JSON-serialisable):
    loss: attack_stats.evaluate of the plain loss attack.
    calibrated: the same for score / reference score, with `reference`
      (describe() of the reference model), or {"skipped": why}.
    size: attack_stats.size_baseline (tumor area as the score).
    settings: timesteps (as given and on the model's schedule), seeds,
      score region, describe(model), bootstrap; scores: per-slice lists.

  Raises:
    errors.UserError: splits without case ids, scores() refusals, a
      reference whose radii differ from the model's (its scores would not
      be on the same pixels).
  """
  kw.setdefault("timesteps", TIMESTEPS)
  kw.setdefault("seeds", SEEDS)
  kw.setdefault("reference_steps", REFERENCE_STEPS)
  kw["score_region"] = kw.get("score_region") or training_region(model)
  kw.pop("name", None)
  if reference is not None and (
      (int(reference.r_out), int(reference.r_in)) != (int(model.r_out), int(model.r_in))):
    raise errors.UserError(
        f"membership: the reference ({reference.source}) has radii r_out="
        f"{reference.r_out}, r_in={reference.r_in}, the model ({model.source}) "
        f"r_out={model.r_out}, r_in={model.r_in}: its scores would not be on the "
        "same pixels")
  g_m, a_m = _patients_and_areas(members, "members")
  g_h, a_h = _patients_and_areas(nonmembers, "non-members")
  stats_kw = dict(member_groups=g_m, nonmember_groups=g_h, n_boot=n_boot,
                  seed=bootstrap_seed)
  s_m = scores(model, members, name="members", **kw)
  s_h = scores(model, nonmembers, name="non-members", **kw)
  out = {"loss": attack_stats.evaluate(s_m, s_h, member_area=a_m, nonmember_area=a_h,
                                       target_fpr=target_fpr, **stats_kw),
         "size": attack_stats.size_baseline(a_m, a_h, **stats_kw)}
  out["scores"] = {"members": [float(x) for x in s_m],
                   "nonmembers": [float(x) for x in s_h]}
  if reference is None:
    out["calibrated"] = {"skipped": no_reference}
  else:
    r_m = scores(reference, members, name="members (reference)", **kw)
    r_h = scores(reference, nonmembers, name="non-members (reference)", **kw)
    if np.any(r_m <= 0) or np.any(r_h <= 0):
      raise errors.UserError(f"membership: the reference ({reference.source}) scores "
                             "a slice 0; the calibrated score divides by it")
    out["calibrated"] = {
        **attack_stats.evaluate(s_m / r_m, s_h / r_h, member_area=a_m,
                                nonmember_area=a_h, target_fpr=target_fpr, **stats_kw),
        "reference": describe(reference)}
    out["scores"].update({"reference_members": [float(x) for x in r_m],
                          "reference_nonmembers": [float(x) for x in r_h]})
  out["settings"] = {
      "timesteps": [int(t) for t in kw["timesteps"]],
      "model_timesteps": list(model_timesteps(
          model.schedule.num_steps, kw["timesteps"], kw["reference_steps"])),
      "reference_steps": int(kw["reference_steps"]),
      "num_steps": int(model.schedule.num_steps),
      "seeds": [int(s) for s in kw["seeds"]],
      "score_region": kw["score_region"],
      **describe(model),
      "n_boot": int(n_boot),
      "bootstrap_seed": int(bootstrap_seed),
      "caliper": attack_stats.SIZE_CALIPER,
  }
  return out
