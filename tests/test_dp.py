"""DP-SGD (dfgm_jax/train/dp.py): accounting against dp-accounting's values,
Poisson sampling by patient, clipping, noise scale, public examples, the
budget refusal and a short DP run of the tiny config that logs epsilon."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfgm_jax import config_checks
from dfgm_jax import errors
from dfgm_jax.train import dp


def _sampling(n=500, q=32 / 500, cap=None, unit="example", m=1, pub=0):
  return dp.Sampling(unit=unit, num_units=n, sampling_probability=q,
                     max_units=n if cap is None else cap, slices_per_unit=m,
                     public_per_step=pub)


def _tiny_dp_config(**dp_fields):
  from configs import tiny
  config = tiny.get_config()
  config.dp.enabled = True
  for k, v in dp_fields.items():
    setattr(config.dp, k, v)
  return config


def _one_level(config):
  """A one-level network on 16 x 16: the tiny preset's per-patient (vmapped)
  step takes minutes to compile on a loaded 2-core CPU."""
  config.data.image_size = 16
  o = config.model.overrides
  o.channel_mult, o.attention_resolutions, o.base_channels = (1,), (), 8
  o.gn_groups, o.spatial_encoder_channels, o.head_channels = 4, 4, 8
  return config


# --- Accounting ------------------------------------------------------------------


def test_accountant_matches_the_measured_reference_values():
  # sigma 1, batch 32 of N 500 (Poisson), 1000 steps, delta 1e-5 (issue 13).
  import dp_accounting
  from dp_accounting import pld, rdp
  s = _sampling()
  rdp_eps = dp.Accountant(s, 1.0, 1e-5, "rdp").epsilon(1000)
  pld_eps = dp.Accountant(s, 1.0, 1e-5, "pld").epsilon(1000)
  assert rdp_eps == pytest.approx(16.056, abs=5e-4)
  assert pld_eps == pytest.approx(14.683, abs=5e-4)
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      32 / 500, dp_accounting.GaussianDpEvent(1.0)), 1000)
  lib_rdp = rdp.RdpAccountant()
  lib_rdp.compose(event)
  assert rdp_eps == lib_rdp.get_epsilon(1e-5)
  lib_pld = pld.PLDAccountant()
  lib_pld.compose(event)
  assert pld_eps == pytest.approx(lib_pld.get_epsilon(1e-5), rel=1e-9)


def test_pld_accounts_for_truncation_and_the_budget_search():
  import dp_accounting
  from dp_accounting import pld
  s = _sampling(n=40, q=0.1, cap=6)  # truncates: 6 slots for E[4] drawn.
  acct = dp.Accountant(s, 1.0, 1e-5, "pld")
  lib = pld.PLDAccountant()
  lib.compose(dp_accounting.TruncatedSubsampledGaussianDpEvent(40, 0.1, 6, 1.0),
              50)
  assert acct.epsilon(50) == pytest.approx(lib.get_epsilon(1e-5), rel=1e-9)
  rdp_acct = dp.Accountant(s, 1.0, 1e-5, "rdp")
  assert rdp_acct.epsilon(0) == 0.0
  most = rdp_acct.max_steps(5.0, multiple=2)
  assert most % 2 == 0 and most > 0
  assert rdp_acct.epsilon(most) <= 5.0 < rdp_acct.epsilon(most + 2)
  assert dp.Accountant(s, 0.0, 1e-5).epsilon(1) == np.inf


# --- Sampling ----------------------------------------------------------------------


def test_plan_sampling_q_and_slots():
  from scipy import stats
  config = _tiny_dp_config(unit="patient", slices_per_patient=2)
  config.train.batch_size, config.train.p_healthy = 32, 0.5
  s = dp.plan_sampling(config, 100, slot_multiple=4)
  assert s.public_per_step == 16 and s.slices_per_unit == 2
  assert s.sampling_probability == pytest.approx(8 / 100)
  assert s.max_units % 4 == 0
  assert stats.binom.sf(s.max_units, 100, 0.08) <= dp.TRUNCATION_TAIL
  exact = dp.plan_sampling(config, 100)
  assert stats.binom.sf(exact.max_units - 1, 100, 0.08) > dp.TRUNCATION_TAIL
  small = dp.plan_sampling(config, 5)  # fewer patients than expected: q = 1.
  assert small.sampling_probability == 1.0 and small.max_units == 5
  config.train.p_healthy = 1.0
  with pytest.raises(errors.ConfigError, match="config.train.p_healthy"):
    dp.plan_sampling(config, 100)


def _pools(num_patients=6, per_patient=3, size=8):
  # One channel: the tiny config's modalities are ('t2',).
  rng = np.random.default_rng(0)
  n = num_patients * per_patient
  tumor = {"image": rng.uniform(-1, 1, (n, size, size, 1)).astype(np.float32),
           "mask": (rng.random((n, size, size, 1)) > 0.7).astype(np.float32)}
  # Each slice's first pixel says its index, to find it in a batch.
  tumor["image"][:, 0, 0, 0] = np.arange(n)
  ids = [f"P{i // per_patient}" for i in range(n)]
  healthy = {"image": rng.uniform(-1, 1, (10, size, size, 1)).astype(np.float32)}
  return healthy, tumor, ids


def test_sampler_draws_patients_by_poisson_and_pads():
  healthy, tumor, ids = _pools()
  groups = dp.unit_groups("patient", 18, ids)
  assert [list(g) for g in groups[:2]] == [[0, 1, 2], [3, 4, 5]]
  s = dp.Sampling("patient", 6, 0.3, 4, 2, 4)
  one = dp.PoissonSampler(healthy, tumor, groups, s, seed=3)
  halves = [dp.PoissonSampler(healthy, tumor, groups, s, seed=3,
                              process_index=p, process_count=2) for p in (0, 1)]
  counts = np.zeros(6)
  for step in range(400):
    b = one.batch(step)
    assert b["image"].shape == (4, 8, 8, 1) and not b["is_tumor"].any()
    assert b["dp_image"].shape == (8, 8, 8, 1) and b["dp_valid"].shape == (8,)
    slot = b["dp_image"][:, 0, 0, 0].reshape(4, 2).astype(int)
    valid = b["dp_valid"].reshape(4, 2)
    assert (valid[:, 0] == valid[:, 1]).all()
    patients = slot // 3
    assert (patients[:, 0] == patients[:, 1])[valid[:, 0] > 0].all()
    drawn, _ = one.draw_units(step)
    counts[drawn] += 1
    if step < 5:  # pure in the step; two processes split the same draw.
      np.testing.assert_array_equal(one.batch(step)["dp_image"], b["dp_image"])
      parts = [h.batch(step) for h in halves]
      assert sum(int(p["dp_valid"].sum()) for p in parts) == int(b["dp_valid"].sum())
      assert parts[0]["dp_image"].shape[0] == 4 and parts[0]["image"].shape[0] == 2
  # Every patient drawn with probability 0.3 (truncation at 4 of 6 is rare).
  np.testing.assert_allclose(counts / 400, 0.3, atol=0.08)


def test_sampler_truncates_to_a_random_subset():
  healthy, tumor, ids = _pools()
  groups = dp.unit_groups("example", 18)
  s = dp.Sampling("example", 18, 0.9, 3, 1, 0)
  sampler = dp.PoissonSampler(healthy, tumor, groups, s, seed=0)
  b = sampler.batch(0)
  assert int(b["dp_valid"].sum()) == 3 and b["image"].shape[0] == 0
  assert sampler.truncated_steps == 1


def test_launch_sampler_is_the_dp_one():
  from launch import train_data
  config = _tiny_dp_config(unit="example")
  sampler = train_data.make_sampler(config, None)  # synthetic reader.
  assert isinstance(sampler, dp.PoissonSampler)
  assert sampler.dp_sampling.num_units == 64
  assert set(sampler.batch(0)) == {"image", "mask", "is_tumor", "dp_image",
                                   "dp_mask", "dp_valid"}


# --- Clipped, noisy gradient ---------------------------------------------------------


def _linear_loss(params, batch, key):
  # Per-example loss x . w: each example's gradient is its x.
  del key
  return batch["x"] @ params["w"]


def _grads(pub_x, priv_x, valid, m=1, clip=1.0, sigma=0.0, batch=10.0, key=0):
  params = {"w": jnp.zeros(pub_x.shape[1] if len(pub_x) else priv_x.shape[1])}
  return dp.private_grads(
      _linear_loss, params, {"x": jnp.asarray(pub_x)},
      {"x": jnp.asarray(priv_x), "valid": jnp.asarray(valid)},
      jax.random.key(key), clip_norm=clip, noise_multiplier=sigma,
      slices_per_unit=m, expected_batch=batch)


def test_clipping_bounds_each_unit_and_public_examples_pass_unclipped():
  huge = np.array([3e6, 4e6, 0.0])        # norm 5e6: clipped to 1.
  small = np.array([0.0, 0.3, 0.4])       # norm 0.5: kept.
  public = np.array([[100.0, 0.0, 0.0]])  # public: never clipped.
  nan_pad = np.full(3, np.nan)            # padding: ignored, even NaN.
  g, aux = _grads(public, np.stack([huge, small, nan_pad]), np.array([1, 1, 0]),
                  clip=1.0, batch=10.0)
  expected = (public[0] + huge / 5e6 + small) / 10.0
  np.testing.assert_allclose(g["w"], expected, rtol=1e-6)
  assert float(aux["units"]) == 2 and float(aux["clipped_frac"]) == 0.5
  assert float(aux["examples"]) == 3
  # Per patient (m = 2): the sum of a patient's slices is clipped, not each.
  a, b = np.array([0.6, 0.0, 0.0]), np.array([0.0, 0.8, 0.0])  # sum norm 1.0
  g, _ = _grads(np.zeros((0, 3)), np.stack([a, b, a, a]), np.array([1, 1, 1, 1]),
                m=2, clip=0.5, batch=1.0)
  np.testing.assert_allclose(g["w"], 0.5 * (a + b) + 0.5 * np.array([1., 0, 0]),
                             rtol=1e-6)


def test_without_clipping_or_noise_it_is_the_plain_gradient():
  rng = np.random.default_rng(1)
  pub, priv = rng.normal(size=(4, 5)), rng.normal(size=(6, 5))
  g, _ = _grads(pub, priv, np.ones(6, np.int32), clip=1e9, batch=10.0)
  np.testing.assert_allclose(g["w"], (pub.sum(0) + priv.sum(0)) / 10.0,
                             rtol=1e-5)


def test_noise_has_std_sigma_clip_over_batch():
  d = 200_000
  priv = np.zeros((2, d), np.float32)
  g, _ = _grads(np.zeros((0, d), np.float32), priv, np.zeros(2, np.int32),
                clip=0.5, sigma=2.0, batch=4.0, key=7)
  w = np.asarray(g["w"])
  # std sigma * C / B = 0.25; 200k draws pin it to about 0.2 %.
  assert np.std(w) == pytest.approx(0.25, rel=0.01)
  assert abs(np.mean(w)) < 0.005
  g2, _ = _grads(np.zeros((0, d), np.float32), priv, np.zeros(2, np.int32),
                 clip=0.5, sigma=2.0, batch=4.0, key=8)
  assert abs(np.corrcoef(w, np.asarray(g2["w"]))[0, 1]) < 0.01


# --- The training step and run -------------------------------------------------------


def test_config_fields_are_checked():
  assert config_checks.DP_UNITS == dp.UNITS
  assert config_checks.DP_ACCOUNTANTS == dp.ACCOUNTANTS
  for field, bad in (("unit", "patients"), ("clip_norm", 0.0),
                     ("delta", 1.0), ("accountant", "gdp"),
                     ("slices_per_patient", 0), ("target_epsilon", -1.0)):
    config = _tiny_dp_config(**{field: bad})
    with pytest.raises(errors.ConfigError, match=f"config.dp.{field}="):
      config_checks.validate(config)


def test_dp_off_is_the_plain_step():
  # The step of a config without the dp section (every config before the
  # option) and with dp.enabled=False trace to the same program.
  from configs import tiny
  from dfgm_jax.train import diffusion
  from dfgm_jax.train import loop
  with_off = _one_level(tiny.get_config())
  assert not with_off.dp.enabled
  without = _one_level(tiny.get_config())
  del without["dp"]
  healthy, tumor, _ = _pools(size=16)
  from dfgm_jax.train import batches
  sampler = batches.MixedSampler(healthy, tumor, 8, 0.5, 0)
  b = loop.stack_batches(sampler.batch, 0, 1)
  texts = []
  for config in (with_off, without):
    graphdef, rest, state = diffusion.init_state(config)
    step = diffusion.make_train_step(graphdef, rest, config)
    texts.append(str(jax.make_jaxpr(step)(state, b)))
  assert texts[0] == texts[1]
  ident = diffusion.run_identity(json.loads(with_off.to_json_best_effort()))
  assert "dp" not in ident  # old workdirs resume.


def test_budget_refusal_names_the_fields(tmp_path):
  from dfgm_jax.train import diffusion
  config = _tiny_dp_config(target_epsilon=1.0)
  config.train.num_steps = 1000
  healthy, tumor, ids = _pools(size=32)
  sampler = dp.make_sampler(config, healthy, tumor, ids)
  with pytest.raises(errors.ConfigError) as e:
    diffusion.train(config, str(tmp_path / "w"), sampler.batch, progress=False)
  msg = str(e.value)
  for name in ("config.dp.target_epsilon=1.0", "config.train.num_steps",
               "config.dp.noise_multiplier", "config.dp.delta", "at most"):
    assert name in msg, msg
  assert not (tmp_path / "w").exists()  # refused before touching the workdir.
  with pytest.raises(errors.ConfigError, match="DP sampler"):
    diffusion.train(config, str(tmp_path / "w"), lambda step: {},
                    progress=False)


@pytest.mark.slow  # about 55 s of CPU, mostly compiling the per-patient step.
def test_short_dp_run_logs_epsilon(tmp_path):
  from dp_accounting import rdp
  import dp_accounting
  from dfgm_jax.train import diffusion
  config = _tiny_dp_config(unit="patient", slices_per_patient=2)
  config.train.num_steps, config.train.log_every = 4, 2
  config.train.checkpoint_every, config.train.tensorboard = 4, False
  _one_level(config)
  healthy, tumor, ids = _pools(size=16)
  sampler = dp.make_sampler(config, healthy, tumor, ids)
  s = sampler.dp_sampling
  assert (s.num_units, s.slices_per_unit, s.public_per_step) == (6, 2, 4)
  result = diffusion.train(config, str(tmp_path), sampler.batch, progress=False)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    lib = rdp.RdpAccountant()
    lib.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        s.sampling_probability, dp_accounting.GaussianDpEvent(1.0)), r["step"]))
    assert r["dp_epsilon"] == lib.get_epsilon(1e-5)
    assert np.isfinite(r["loss"]) and 0 <= r["dp_clipped_frac"] <= 1
    assert 0 <= r["dp_units"] <= s.max_units and r["dp_unit_grad_norm"] >= 0
  assert result["dp_epsilon"] == rows[-1]["dp_epsilon"] > rows[0]["dp_epsilon"]
  assert result["metrics"]["dp_epsilon"] == rows[-1]["dp_epsilon"]
  leaves = jax.tree.leaves(result["state"]["params"])
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
