"""Loss-based membership inference (dfgm_jax/privacy/membership.py, issue 14).

The attack statistics against brute-force counts; the score against a
reference computed from the network's own eps function; and the attack on a
deliberately memorizing tiny model (the project's trainer, 8 tumor slices,
100 steps) against a fresh one. The pool is the phantom's 25 tumor slices
(preprocessed_2020, 32 x 32: 5 cases of 5 slices, 2 apart), members every
third slice in (case, slice) order: every case is on both sides, so the two
sets differ only in membership, and a member's non-members include its
neighbouring slices, which makes the attack harder than the real one
(held-out test slices are other patients).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from scipy import ndimage

from data_pipeline import slice_sets
from dfgm_jax import errors
from dfgm_jax.diffusion import denoiser
from dfgm_jax.privacy import membership
from dfgm_jax.synthesis import masks
from dfgm_jax.train import batches
from dfgm_jax.train import diffusion

TUMOR_SPLITS = ("CBICA_train", "TCIA_train", "TCIA_test")
N_MEMBERS = 8
# 100 steps at batch 8 memorize the 8 members: AUC 0.93 here (0.88 to 1.0
# over the member draws measured; 40 steps gave 0.69, 80 steps 0.93).
STEPS = 100


# --- Attack statistics -----------------------------------------------------------


def _brute_auc(members, nonmembers):
  m, h = np.asarray(members)[:, None], np.asarray(nonmembers)[None, :]
  return float(np.mean((m < h) + 0.5 * (m == h)))


def _brute_best_tpr(members, nonmembers, fpr):
  """Best TPR of the rule `score < thr` over every threshold with FPR <= fpr."""
  best = 0.0
  for thr in np.append(np.unique(np.concatenate([members, nonmembers])), np.inf):
    if np.mean(nonmembers < thr) <= fpr:
      best = max(best, float(np.mean(members < thr)))
  return best


@pytest.mark.parametrize("n_members,n_nonmembers", [(40, 450), (13, 50)])
def test_auc_and_tpr_match_brute_force(n_members, n_nonmembers):
  rng = np.random.default_rng(n_nonmembers)
  # Rounded: many ties, which count 1/2.
  members = np.round(rng.normal(-0.5, 1.0, n_members), 1)
  nonmembers = np.round(rng.normal(0.0, 1.0, n_nonmembers), 1)
  out = membership.attack_summary(members, nonmembers)
  assert out["auc"] == pytest.approx(_brute_auc(members, nonmembers), abs=1e-12)
  assert out["tpr_at_fpr"] == pytest.approx(
      _brute_best_tpr(members, nonmembers, 0.01), abs=1e-12)
  assert out["fpr"] <= 0.01
  assert out["fpr"] == np.mean(nonmembers < out["threshold"])
  assert out["tpr_at_fpr"] == np.mean(members < out["threshold"])
  assert (out["n_members"], out["n_nonmembers"]) == (n_members, n_nonmembers)
  assert out["member_median"] == np.median(members)
  assert json.loads(json.dumps(out)) == out


def test_auc_extremes():
  low, high = np.arange(10.0), np.arange(10.0, 30.0)
  separated = membership.attack_summary(low, high)
  assert (separated["auc"], separated["tpr_at_fpr"]) == (1.0, 1.0)
  reversed_ = membership.attack_summary(high, low)
  assert (reversed_["auc"], reversed_["tpr_at_fpr"]) == (0.0, 0.0)
  assert membership.attack_summary(low, low)["auc"] == 0.5
  rng = np.random.default_rng(0)
  same = membership.attack_summary(rng.normal(size=2000), rng.normal(size=2000))
  assert abs(same["auc"] - 0.5) < 0.04  # std of the AUC here: 0.009.
  shifted = membership.attack_summary(rng.normal(1.0, 1.0, 500), rng.normal(size=500))
  assert shifted["auc"] < 0.3  # members score higher: the attack is wrong.


def test_attack_refuses_empty_or_nan_scores():
  with pytest.raises(errors.UserError, match="no member scores"):
    membership.attack_summary([], [1.0])
  with pytest.raises(errors.UserError, match="non-member scores are not all finite"):
    membership.attack_summary([1.0], [np.nan])


def test_timesteps_scale_to_the_models_schedule():
  assert membership.model_timesteps(1000) == membership.TIMESTEPS
  assert membership.model_timesteps(100) == (5, 10, 20, 40)
  with pytest.raises(errors.UserError, match="outside"):
    membership.model_timesteps(100, (50, 1000))


# --- The memorizing model --------------------------------------------------------


def _subset(pool, idx):
  return {k: v[idx] for k, v in pool.items()}


@pytest.fixture(scope="module")
def pool(preprocessed_2020):
  """The 25 tumor slices in (case, slice) order, and the healthy split."""
  data_dir, _ = preprocessed_2020
  parts = [slice_sets.load_split(data_dir, s) for s in TUMOR_SPLITS]
  tumor = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "mask")}
  where = [(c, i) for p in parts for c, i in zip(p["case_id"], p["slice_index"])]
  order = sorted(range(len(where)), key=lambda j: where[j])
  healthy = slice_sets.load_split(data_dir, "healthy")
  return _subset(tumor, np.array(order)), {"image": healthy["image"]}


def _memorizing_config():
  """The tiny config made to memorize: tumor slices only, no augmentation."""
  from configs import tiny
  config = tiny.get_config()
  t = config.train
  t.reader = "grain"
  t.num_steps = t.checkpoint_every = t.log_every = STEPS
  t.p_healthy = 0.0
  t.aug_hflip = t.aug_rot_prob = 0.0
  t.lr = 2e-3
  t.ema_decay = 0.9  # the EMA weights follow the last steps closely.
  t.tensorboard = False
  return config


def _train(members, healthy, workdir):
  config = _memorizing_config()
  if members is None:  # public healthy slices only.
    config.train.p_healthy = 1.0
  sampler = batches.MixedSampler(healthy, members, config.train.batch_size,
                                 config.train.p_healthy, config.train.sampler_seed)
  diffusion.train(config, str(workdir), sampler.batch, progress=False)
  return denoiser.Denoiser.load(str(workdir), config)


@pytest.fixture(scope="module")
def memorizing(pool, tmp_path_factory):
  """(model, members, non-members): the model trained on every third slice."""
  tumor, healthy = pool
  chosen = np.arange(N_MEMBERS) * 3
  members = _subset(tumor, chosen)
  nonmembers = _subset(tumor, np.setdiff1d(np.arange(len(tumor["image"])), chosen))
  model = _train(members, healthy, tmp_path_factory.mktemp("memorizing"))
  return model, members, nonmembers


def test_memorizing_model_is_caught_and_a_fresh_one_is_not(memorizing):
  model, members, nonmembers = memorizing
  out = membership.audit_model(model, members, nonmembers)
  assert out["auc"] > 0.75, out  # measured 0.93; chance: 0.5 +- 0.13.
  assert out["member_median"] < out["nonmember_median"]
  assert out["tpr_at_fpr"] > 0.0
  assert (out["n_members"], out["n_nonmembers"]) == (8, 17)
  s = out["settings"]
  assert s["timesteps"] == list(membership.TIMESTEPS)
  assert s["model_timesteps"] == [5, 10, 20, 40]  # tiny: T = 100.
  assert (s["step"], s["source"], s["seeds"]) == (STEPS, model.source, [0, 1])
  assert (s["score_region"], s["cond_region"], s["loss_region"]) == ("ring",) * 3
  assert len(out["scores"]["members"]) == 8
  assert json.loads(json.dumps(out)) == out
  # The same network, untrained (zero output layer: noise-only losses):
  # measured 0.56. With 8 vs 17 slices a blind model's AUC has a std of 0.13.
  # Same graph, committed like the restored weights: the compile is reused.
  params = jax.device_put(denoiser.Denoiser.init(model.config).params,
                          jax.local_devices()[0])
  fresh = dataclasses.replace(model, params=params)
  blind = membership.audit_model(fresh, members, nonmembers)
  assert abs(blind["auc"] - 0.5) < 0.3, blind


def test_scores_are_deterministic_and_batch_independent(memorizing):
  model, members, _ = memorizing
  full = membership.scores(model, members)
  np.testing.assert_array_equal(full, membership.scores(model, members))
  # 3 batches of 3 (the last padded) against one of 32 (24 padded).
  np.testing.assert_allclose(membership.scores(model, members, batch_size=3),
                             full, rtol=1e-5, atol=1e-6)
  other = membership.scores(model, members, seeds=(2, 3))
  assert not np.allclose(other, full)


def _ring_reference(tumor, r_out):
  """dilate(M, disk r_out) minus M, with scipy (independent of masks.py)."""
  disk = masks.disk(r_out).astype(bool)
  out = np.zeros_like(tumor)
  for i, m in enumerate(tumor[..., 0] > 0):
    out[i, ..., 0] = ndimage.binary_dilation(m, disk) & ~m
  return out


def test_score_is_the_ring_mse_of_the_networks_own_inputs(memorizing):
  """Reference from Denoiser.eps_fn: the error counts in the ring and only there."""
  model, members, _ = memorizing
  t, seed = 20, 1  # t = 200 on the 1000-step grid.
  x0, tumor = members["image"], members["mask"]
  noise = np.asarray(membership.example_noise(seed, t, np.arange(len(x0)), x0.shape[1:]))
  abar = np.asarray(model.schedule.alphas_cumprod)[t]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise
  n = len(x0)
  ring = _ring_reference(tumor, model.r_out)
  # G1 is conditioned on the ring of its tumor mask, class 1 (tumor).
  eps_fn = jax.jit(lambda p, *args: model.eps_fn(p)(*args))  # eager: 3x slower.
  eps_hat = np.asarray(eps_fn(model.params, x_t, np.full(n, t), np.ones(n, np.int32),
                              ring, tumor))
  err = (noise - eps_hat) ** 2
  want = (err * ring).sum(axis=(1, 2, 3)) / ring.sum(axis=(1, 2, 3))
  got = membership.scores(model, members, timesteps=(200,), seeds=(seed,))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # The errors outside the ring are other numbers: the mask matters.
  outside = (err * (1 - ring)).sum(axis=(1, 2, 3)) / (1 - ring).sum(axis=(1, 2, 3))
  assert np.all(np.abs(outside - want) > 1e-3 * want)


def test_scores_refuse_what_does_not_fit(memorizing):
  model, members, _ = memorizing
  healthy_like = dict(members, mask=np.zeros_like(members["mask"]))
  with pytest.raises(errors.UserError, match="8 slices have an empty ring"):
    membership.scores(model, healthy_like)
  small = {"image": members["image"][:, :16, :16], "mask": members["mask"][:, :16, :16]}
  with pytest.raises(errors.UserError, match=r"takes \(32, 32, 1\)"):
    membership.scores(model, small)
  with pytest.raises(errors.UserError, match="no 'mask'"):
    membership.scores(model, {"image": members["image"]})


@pytest.mark.slow
def test_independent_model_is_near_chance(pool, memorizing, tmp_path):
  """The same training on the healthy slices only: like G2, it never saw a member.

  Measured AUC 0.43. Not a model trained on other tumor slices of the pool:
  every case is among the members, so such a model would have seen their
  neighbours.
  """
  _, healthy = pool
  _, members, nonmembers = memorizing
  model = _train(None, healthy, tmp_path / "independent")
  independent = membership.audit_model(model, members, nonmembers)
  assert abs(independent["auc"] - 0.5) < 0.3, independent
