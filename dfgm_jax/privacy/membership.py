"""Loss-based membership inference against a diffusion model (ALGORITHM.md 9.5).

A model that memorized its training slices denoises them better than slices
it never saw. The attack (Carlini et al. 2023, section on MIA) scores every
slice by the model's own training loss and predicts "member" for a low one:

  s(x) = mean over t in TIMESTEPS and fixed noise seeds of the ring-masked
         epsilon-MSE || m * (eps - eps_theta(x_t, t, ...)) ||^2 / |m|

with x_t = q_sample(x, t, eps), the network given exactly the inputs of its
training step (class 1 = tumor slice, its conditioning region of the tumor
mask, the tumor mask) and m the ring dilate(M, r_out) minus M at the model's
radii. G1's loss was on the ring, G2's on the dilated region, but the score
is always taken on the ring: the region whose privacy the paper claims.

  TIMESTEPS       the four timesteps of ALGORITHM.md (on a 1000-step grid).
  example_noise   the fixed noise of each slice, timestep and seed.
  scores          (N,) scores of a split, jitted and batched, deterministic.
  attack_summary  ROC AUC and TPR at 1 % FPR of members vs non-members.
  audit_model     both splits' scores, the summary and the settings used.

Members = the model's training slices, non-members = the same center's
held-out test slices. AUC about 0.5 means the loss does not tell them apart
(G2's claim); clearly above 0.5 means the model memorized its members.
"""

from __future__ import annotations

import functools
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfgm_jax import errors
from dfgm_jax.diffusion import loss as loss_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.synthesis import masks

# ALGORITHM.md 9.5, on the 1000-step grid of the default schedule
# (configs/diffusion.py); a model with T steps gets round(t * T / 1000).
TIMESTEPS = (50, 100, 200, 400)
REFERENCE_STEPS = 1000
SEEDS = (0, 1)
# The region the score is taken on, whatever the model's loss region.
SCORE_REGION = "ring"
TARGET_FPR = 0.01


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
  """(B,) ring-masked eps-MSE of one batch at one timestep and noise seed.

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
           score_region: str = SCORE_REGION, name: str = "split") -> np.ndarray:
  """(N,) membership score of each slice of `split` under `model`; lower = member.

  Args:
    model: a denoiser.Denoiser (Denoiser.load, or G2 through
      synthesis.local.load_shared_model): its network, EMA weights, schedule,
      radii and conditioning region (model.region) are used.
    split: a SliceData.load_split dict: `image` (N,S,S,C) in [-1, 1] and
      `mask` (N,S,S,1) tumor masks; every slice needs a non-empty ring.
    timesteps: on a reference_steps grid (scaled to the model's T).
    seeds: noise seeds; the score is the mean over timesteps x seeds.
    batch_size: slices per network call; the last (or only) batch is
      padded (one compile) and the scores do not depend on it.
    reference_steps: the grid `timesteps` are given on.
    score_region: the masks.region the MSE is taken on (the ring).
    name: the split's name, for messages.

  Returns:
    float64 (N,) scores, deterministic for given seeds.

  Raises:
    errors.UserError: a split that does not fit the model, a slice with an
      empty ring (no tumor), bad timesteps or batch size.
  """
  images, tumor = _check_split(model, split, name)
  if int(batch_size) < 1:
    raise errors.ConfigError(f"membership scores: batch_size={batch_size}: must be >= 1")
  seeds = tuple(int(s) for s in seeds)
  if not seeds:
    raise errors.UserError("membership scores: no noise seeds given")
  ts = model_timesteps(model.schedule.num_steps, timesteps, reference_steps)
  ring = np.asarray(masks.region(jnp.asarray(tumor), score_region, model.r_out,
                                 model.r_in))
  empty = np.flatnonzero(ring.reshape(len(ring), -1).sum(axis=1) == 0)
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


def _scores_1d(name: str, values) -> np.ndarray:
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise errors.UserError(f"membership attack: no {name} scores")
  if not np.all(np.isfinite(values)):
    raise errors.UserError(f"membership attack: {name} scores are not all finite")
  return values


def roc_auc(member_scores, nonmember_scores) -> float:
  """P(member score < non-member score) + 1/2 P(equal): Mann-Whitney by ranks."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  m = _scores_1d("member", member_scores)
  h = _scores_1d("non-member", nonmember_scores)
  # Midranks (ties share their mean rank) of the negated scores: a lower
  # score ranks as a more likely member.
  ranks = stats.rankdata(-np.concatenate([m, h]), method="average")
  u = ranks[:m.size].sum() - m.size * (m.size + 1) / 2.0
  return float(u / (m.size * h.size))


def attack_summary(member_scores, nonmember_scores,
                   target_fpr: float = TARGET_FPR) -> Dict[str, float]:
  """ROC AUC and TPR at a low FPR of the loss attack (lower score = member).

  The threshold comes from the non-members alone: the largest value below
  which at most target_fpr of them fall, i.e. their k-th smallest score with
  k = floor(target_fpr * n_nonmembers). A slice is predicted a member when
  its score is strictly below it. With fewer than 1/target_fpr non-members
  that is their minimum (no false positive allowed).

  Returns:
    auc: ROC AUC, members positive, ties counting 1/2. About 0.5: the loss
      does not tell members from non-members; near 1: memorized members.
    tpr_at_fpr: fraction of members below the threshold; fpr: the
      non-members' fraction below it (<= target_fpr); target_fpr, threshold.
    member_median, nonmember_median, n_members, n_nonmembers.
  """
  m = _scores_1d("member", member_scores)
  h = _scores_1d("non-member", nonmember_scores)
  if not 0.0 <= target_fpr < 1.0:
    raise errors.UserError(f"membership attack: target_fpr={target_fpr} not in [0, 1)")
  k = int(np.floor(target_fpr * h.size))
  threshold = float(np.sort(h)[k])
  return {
      "auc": roc_auc(m, h),
      "tpr_at_fpr": float(np.mean(m < threshold)),
      "fpr": float(np.mean(h < threshold)),
      "target_fpr": float(target_fpr),
      "threshold": threshold,
      "member_median": float(np.median(m)),
      "nonmember_median": float(np.median(h)),
      "n_members": int(m.size),
      "n_nonmembers": int(h.size),
  }


def audit_model(model, members: dict, nonmembers: dict, *,
                target_fpr: float = TARGET_FPR, **kw) -> dict:
  """The attack on one model: scores of both splits, summary, settings.

  Args:
    model: the Denoiser (G1, or G2 as synthesis.local.SharedModel).
    members: its training slices (a load_split dict).
    nonmembers: the same center's held-out test slices.
    target_fpr: the FPR of the reported TPR.
    **kw: scores()'s keyword arguments (timesteps, seeds, batch_size, ...).

  Returns:
    attack_summary's fields, plus `settings` (timesteps as given and on the
    model's schedule, seeds, score region, the model's conditioning region,
    loss region, radii, source, model_id, step) and `scores` (members,
    nonmembers: the per-slice lists). JSON-serialisable.
  """
  kw.setdefault("timesteps", TIMESTEPS)
  kw.setdefault("seeds", SEEDS)
  kw.setdefault("reference_steps", REFERENCE_STEPS)
  kw.setdefault("score_region", SCORE_REGION)
  kw.pop("name", None)
  s_m = scores(model, members, name="members", **kw)
  s_h = scores(model, nonmembers, name="non-members", **kw)
  out = attack_summary(s_m, s_h, target_fpr)
  out["settings"] = {
      "timesteps": [int(t) for t in kw["timesteps"]],
      "model_timesteps": list(model_timesteps(
          model.schedule.num_steps, kw["timesteps"], kw["reference_steps"])),
      "reference_steps": int(kw["reference_steps"]),
      "num_steps": int(model.schedule.num_steps),
      "seeds": [int(s) for s in kw["seeds"]],
      "score_region": kw["score_region"],
      "cond_region": model.region,
      "loss_region": model.loss_region,
      "r_out": int(model.r_out),
      "r_in": int(model.r_in),
      "source": str(model.source),
      "model_id": model.model_id,
      "step": int(model.step),
  }
  out["scores"] = {"members": [float(x) for x in s_m],
                   "nonmembers": [float(x) for x in s_h]}
  return out
