"""Membership inference (dfgm_jax/privacy/membership.py, attack_stats.py).

The attack statistics against brute-force counts and on simulated scores
of known behaviour (interval coverage, patients as the bootstrap's unit, the
FPR reached, size matching, calibration); the score against a
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
import types

import jax
import numpy as np
import pytest
from scipy import ndimage

from data_pipeline import slice_sets
from dfgm_jax import errors
from dfgm_jax.diffusion import denoiser
from dfgm_jax.privacy import attack_stats
from dfgm_jax.privacy import membership
from dfgm_jax.synthesis import masks
from dfgm_jax.train import batches
from dfgm_jax.train import diffusion

TUMOR_SPLITS = ("CBICA_train", "TCIA_train", "TCIA_test")
N_MEMBERS = 8
# 100 steps at batch 8 memorize the 8 members: AUC 0.93 here (0.88 to 1.0
# over the member draws measured; 40 steps gave 0.69, 80 steps 0.93).
STEPS = 100


# --- Attack statistics (dfgm_jax/privacy/attack_stats.py) -------------------------


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


def _evaluate(members, nonmembers, **kw):
  """evaluate() with every slice its own patient unless groups are given."""
  kw.setdefault("member_groups", np.arange(len(members)))
  kw.setdefault("nonmember_groups", np.arange(len(nonmembers)))
  kw.setdefault("n_boot", 200)
  return attack_stats.evaluate(members, nonmembers, **kw)


@pytest.mark.parametrize("n_members,n_nonmembers", [(40, 450), (13, 50)])
def test_auc_and_tpr_match_brute_force(n_members, n_nonmembers):
  rng = np.random.default_rng(n_nonmembers)
  # Rounded: many ties, which count 1/2.
  members = np.round(rng.normal(-0.5, 1.0, n_members), 1)
  nonmembers = np.round(rng.normal(0.0, 1.0, n_nonmembers), 1)
  out = _evaluate(members, nonmembers)
  assert out["auc"] == pytest.approx(_brute_auc(members, nonmembers), abs=1e-12)
  assert out["tpr_at_fpr"] == pytest.approx(
      _brute_best_tpr(members, nonmembers, 0.01), abs=1e-12)
  assert out["fpr"] <= 0.01
  assert out["fpr"] == np.mean(nonmembers < out["threshold"])
  assert out["false_positives"] == np.sum(nonmembers < out["threshold"])
  assert out["tpr_at_fpr"] == np.mean(members < out["threshold"])
  assert (out["n_members"], out["n_nonmembers"]) == (n_members, n_nonmembers)
  assert out["member_median"] == np.median(members)
  lo, hi = out["auc_interval"]
  assert lo < out["auc"] < hi
  assert json.loads(json.dumps(out)) == out


def test_weighted_auc_equals_the_auc_of_the_expanded_sample():
  """A bootstrap replicate's weights count slices that many times."""
  rng = np.random.default_rng(1)
  m, h = np.round(rng.normal(size=7), 1), np.round(rng.normal(size=5), 1)
  wm, wh = rng.integers(0, 3, (4, 7)).astype(float), rng.integers(1, 3, (4, 5)).astype(float)
  wm[:, 0] = 1.0  # no replicate without members.
  got = attack_stats.weighted_auc(attack_stats.pair_wins(m, h), wm, wh)
  for b in range(4):
    want = _brute_auc(np.repeat(m, wm[b].astype(int)), np.repeat(h, wh[b].astype(int)))
    assert got[b] == pytest.approx(want, abs=1e-12)
    tpr = attack_stats.tpr_at(m, h, 0.2, wm[b], wh[b])
    em, eh = np.repeat(m, wm[b].astype(int)), np.repeat(h, wh[b].astype(int))
    assert tpr["threshold"] == np.sort(eh)[int(np.floor(0.2 * eh.size))]
    assert tpr["tpr"] == pytest.approx(np.mean(em < tpr["threshold"]), abs=1e-12)


def test_auc_extremes():
  low, high = np.arange(10.0), np.arange(10.0, 30.0)
  separated = _evaluate(low, high)
  assert (separated["auc"], separated["tpr_at_fpr"]) == (1.0, 1.0)
  assert separated["auc_interval"] == [1.0, 1.0]
  reversed_ = _evaluate(high, low)
  assert (reversed_["auc"], reversed_["tpr_at_fpr"]) == (0.0, 0.0)
  assert attack_stats.roc_auc(low, low) == 0.5
  rng = np.random.default_rng(0)
  same = attack_stats.roc_auc(rng.normal(size=2000), rng.normal(size=2000))
  assert abs(same - 0.5) < 0.04  # std of the AUC here: 0.009.
  shifted = attack_stats.roc_auc(rng.normal(1.0, 1.0, 500), rng.normal(size=500))
  assert shifted < 0.3  # members score higher: the attack is wrong.


def test_attack_refuses_empty_nan_or_unmatched_inputs():
  with pytest.raises(errors.UserError, match="no member scores"):
    _evaluate([], [1.0])
  with pytest.raises(errors.UserError, match="non-member scores are not all finite"):
    _evaluate([1.0], [np.nan])
  with pytest.raises(errors.UserError, match="2 member patients for 3 scores"):
    _evaluate([1.0, 2.0, 3.0], [1.0], member_groups=["a", "b"])


def _patients(rng, n_patients, per_patient, shift, sd_patient=0.7, sd_slice=0.3):
  """Scores with a patient effect: slices of one patient score alike."""
  effect = rng.normal(0.0, sd_patient, n_patients)
  groups = np.repeat(np.arange(n_patients), per_patient)
  return effect[groups] + rng.normal(0.0, sd_slice, groups.size) + shift, groups


def test_patient_bootstrap_covers_the_truth_and_a_slice_bootstrap_does_not():
  """Simulated attacks of known AUC: Phi(d / sqrt(2 (sd_p^2 + sd_s^2))) = 0.679.

  Resampling patients keeps the interval near its 95 %; resampling slices
  of the same scores treats 4 alike slices as 4 draws and misses the
  truth far more often.
  """
  from scipy import stats
  d = 0.5
  truth = stats.norm.cdf(d / np.sqrt(2 * (0.7 ** 2 + 0.3 ** 2)))
  rng = np.random.default_rng(0)
  covered = {"patients": 0, "slices": 0}
  draws = 100
  for i in range(draws):
    m, gm = _patients(rng, 15, 4, -d)
    h, gh = _patients(rng, 12, 4, 0.0)
    for unit, groups in (("patients", (gm, gh)), ("slices", (None, None))):
      kw = {} if groups[0] is None else dict(member_groups=groups[0],
                                             nonmember_groups=groups[1])
      lo, hi = _evaluate(m, h, seed=i, **kw)["auc_interval"]
      covered[unit] += lo <= truth <= hi
  assert covered["patients"] >= 0.85 * draws, covered
  assert covered["slices"] <= covered["patients"] - 0.1 * draws, covered


def test_one_patient_with_many_slices_widens_the_interval():
  rng = np.random.default_rng(3)
  m, _ = _patients(rng, 40, 1, -0.3)
  h, _ = _patients(rng, 40, 1, 0.0)
  # The same scores, but 30 of the members' slices are one patient's,
  # shifted alike (as one patient's slices are).
  grouped = np.concatenate([np.zeros(30, int), np.arange(1, 11)])
  m_grouped = m + np.where(grouped == 0, -0.5, 0.0)
  apart = _evaluate(m_grouped, h, n_boot=500)
  together = _evaluate(m_grouped, h, member_groups=grouped, n_boot=500)
  assert apart["auc"] == together["auc"]  # the point estimate does not change.
  width = lambda out: out["auc_interval"][1] - out["auc_interval"][0]
  assert width(together) > 1.25 * width(apart), (apart["auc_interval"],
                                                 together["auc_interval"])
  assert together["n_member_patients"] == 11 and apart["n_member_patients"] == 40
  # Seeded: the same scores and seed give the same interval.
  assert _evaluate(m_grouped, h, member_groups=grouped, n_boot=500) == together


@pytest.mark.parametrize("n_nonmembers,false_positives,reachable", [
    (16, 0, False), (99, 0, False), (100, 1, True), (450, 4, True)])
def test_the_fpr_reached_is_named(n_nonmembers, false_positives, reachable):
  """With n non-members the smallest non-zero FPR is 1/n: 1 % is not
  reachable under 100 of them, and the TPR is then at 0 false positives."""
  rng = np.random.default_rng(n_nonmembers)
  out = _evaluate(rng.normal(-1.0, 1.0, 30), rng.normal(size=n_nonmembers))
  assert out["false_positives"] == false_positives
  assert out["fpr"] == false_positives / n_nonmembers <= 0.01
  assert out["min_fpr"] == 1.0 / n_nonmembers
  assert out["fpr_reachable"] is reachable
  # A blind score: a member is below the (k+1)-th of n non-members with
  # probability (k+1)/(n+1).
  assert out["chance_tpr"] == (false_positives + 1) / (n_nonmembers + 1)


def test_blind_score_tpr_at_the_threshold_averages_chance():
  """chance_tpr is what a score that cannot tell the two apart gets."""
  rng = np.random.default_rng(5)
  tprs = [_evaluate(rng.normal(size=50), rng.normal(size=16), n_boot=1)["tpr_at_fpr"]
          for _ in range(400)]
  assert np.mean(tprs) == pytest.approx(1 / 17, abs=0.015)


def test_size_matching_removes_a_pure_size_effect():
  """Scores that depend on tumor size only, members' tumors larger: the
  plain AUC reads it as membership, the size-matched AUC does not, and the
  size baseline shows the sizes differ."""
  rng = np.random.default_rng(7)
  plain, matched = [], []
  for _ in range(20):
    area_m, area_h = rng.lognormal(6.0, 0.5, 60), rng.lognormal(5.5, 0.5, 40)
    # A larger tumor has a lower loss, and nothing else matters.
    m = -area_m / 500 + rng.normal(0.0, 0.05, 60)
    h = -area_h / 500 + rng.normal(0.0, 0.05, 40)
    out = _evaluate(m, h, member_area=area_m, nonmember_area=area_h, n_boot=50)
    plain.append(out["auc"])
    matched.append(out["matched_auc"])
    assert out["matched_pairs"] > 50 and out["matched_members"] > 0.5
  assert np.mean(plain) > 0.7
  assert abs(np.mean(matched) - 0.5) < 0.05, matched
  size = attack_stats.size_baseline(area_m, area_h, member_groups=np.arange(60),
                                    nonmember_groups=np.arange(40), n_boot=200)
  assert size["auc"] < 0.35 and size["auc_interval"][1] < 0.5  # members larger.


def test_size_matching_keeps_a_membership_effect():
  rng = np.random.default_rng(8)
  area_m = area_h = rng.lognormal(6.0, 0.5, 50)
  m, h = rng.normal(-1.0, 1.0, 50), rng.normal(0.0, 1.0, 50)
  out = _evaluate(m, h, member_area=area_m, nonmember_area=area_h)
  assert out["matched_auc"] > 0.7 and out["matched_auc_interval"][0] > 0.5
  assert out["matched_member_patients"] == out["matched_nonmember_patients"] == 50
  none = _evaluate(m, h, member_area=np.full(50, 100.0), nonmember_area=np.full(50, 300.0))
  assert none["matched_auc"] is None and none["matched_pairs"] == 0
  assert none["matched_member_patients"] == 0


def test_calibrated_attack_beats_the_plain_one_when_difficulty_varies():
  """Per-slice difficulty (a loss scale of 0.2 to 5) drowns a 30 % lower
  loss on members; a reference model that finds the same slices as hard
  cancels it."""
  rng = np.random.default_rng(11)
  hard_m, hard_h = rng.lognormal(0.0, 0.8, 80), rng.lognormal(0.0, 0.8, 80)
  target_m = hard_m * 0.7 * rng.lognormal(0.0, 0.1, 80)
  target_h = hard_h * rng.lognormal(0.0, 0.1, 80)
  ref_m, ref_h = hard_m * rng.lognormal(0.0, 0.1, 80), hard_h * rng.lognormal(0.0, 0.1, 80)
  plain = _evaluate(target_m, target_h)
  calibrated = _evaluate(target_m / ref_m, target_h / ref_h)
  assert plain["auc"] < 0.7 and plain["tpr_at_fpr"] < 0.1
  assert calibrated["auc"] > 0.9
  assert calibrated["auc_interval"][0] > plain["auc_interval"][1]
  assert calibrated["tpr_at_fpr"] > plain["tpr_at_fpr"] + 0.3


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
  tumor = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "mask", "case_id")}
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


def _fresh(model):
  """The same network, untrained (zero output layer: noise-only losses).
  Same graph, committed like the restored weights: the compile is reused."""
  params = jax.device_put(denoiser.Denoiser.init(model.config).params,
                          jax.local_devices()[0])
  return dataclasses.replace(model, params=params)


def test_memorizing_model_is_caught_and_a_fresh_one_is_not(memorizing):
  model, members, nonmembers = memorizing
  out = membership.audit_model(model, members, nonmembers)
  loss = out["loss"]
  assert loss["auc"] > 0.75, loss  # measured 0.93; chance: 0.5 +- 0.13.
  assert loss["member_median"] < loss["nonmember_median"]
  assert loss["tpr_at_fpr"] > 0.0
  assert (loss["n_members"], loss["n_nonmembers"]) == (8, 17)
  # 5 cases, every one on both sides: the bootstrap draws 5 patients a side.
  assert (loss["n_member_patients"], loss["n_nonmember_patients"]) == (5, 5)
  assert loss["auc_interval"][0] <= loss["auc"] <= loss["auc_interval"][1]
  # 17 non-members: 1 % is not reachable, the TPR is at 0 false positives.
  assert (loss["false_positives"], loss["fpr_reachable"]) == (0, False)
  assert out["calibrated"] == {"skipped": "no reference model given"}
  assert set(out["size"]) >= {"auc", "auc_interval"}
  s = out["settings"]
  assert s["timesteps"] == list(membership.TIMESTEPS)
  assert s["model_timesteps"] == [5, 10, 20, 40]  # tiny: T = 100.
  assert (s["step"], s["source"], s["seeds"]) == (STEPS, model.source, [0, 1])
  assert (s["score_region"], s["cond_region"], s["loss_region"]) == ("ring",) * 3
  assert len(out["scores"]["members"]) == 8
  assert json.loads(json.dumps(out)) == out
  # With 8 vs 17 slices a blind model's AUC has a std of 0.13 (measured 0.56).
  blind = membership.audit_model(_fresh(model), members, nonmembers)
  assert abs(blind["loss"]["auc"] - 0.5) < 0.3, blind["loss"]


def test_calibrated_attack_divides_by_the_references_scores(memorizing):
  model, members, nonmembers = memorizing
  reference = _fresh(model)
  one = dict(timesteps=(200,), seeds=(0,))  # one network call per batch: fast.
  out = membership.audit_model(model, members, nonmembers, reference=reference,
                               n_boot=50, **one)
  sc = out["scores"]
  ratio_m = np.divide(sc["members"], sc["reference_members"])
  ratio_h = np.divide(sc["nonmembers"], sc["reference_nonmembers"])
  cal = out["calibrated"]
  assert cal["auc"] == attack_stats.roc_auc(ratio_m, ratio_h)
  assert cal["reference"]["source"] == str(reference.source)
  # The reference scores on the target's region, with its own network.
  np.testing.assert_allclose(sc["reference_members"],
                             membership.scores(reference, members, **one), rtol=1e-6)
  # Refused before anything is scored: a reference of other radii, splits
  # that do not name their patients.
  other = types.SimpleNamespace(r_out=model.r_out + 1, r_in=model.r_in, source="other")
  with pytest.raises(errors.UserError, match="not be on the same pixels"):
    membership.audit_model(model, members, nonmembers, reference=other, **one)
  with pytest.raises(errors.UserError, match="no 'case_id'"):
    membership.audit_model(model, {k: members[k] for k in ("image", "mask")}, nonmembers)


def test_a_model_is_scored_on_the_region_its_loss_weighed(memorizing):
  """G2's export records loss_region 'dilated': its score covers the tumor too."""
  model, members, _ = memorizing
  as_g2 = dataclasses.replace(model, loss_region="dilated")
  assert membership.training_region(as_g2) == "dilated"
  assert membership.training_region(dataclasses.replace(model, loss_region=None)) == "ring"
  one = dict(timesteps=(200,), seeds=(0,))
  dilated = membership.scores(as_g2, members, **one)
  np.testing.assert_array_equal(dilated, membership.scores(
      model, members, score_region="dilated", **one))
  assert not np.allclose(dilated, membership.scores(model, members, **one))


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
  independent = membership.audit_model(model, members, nonmembers)["loss"]
  assert abs(independent["auc"] - 0.5) < 0.3, independent
