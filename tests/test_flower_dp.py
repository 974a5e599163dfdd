"""DP-SGD in the Flower app (launch/flower_app): a site's round is the in-job
engine's DP client update with the site's own secret seed, accounted at the
site's own sampling rate; a site over its budget, or asked for a round it
already released, refuses before training; the server logs each site's
epsilon and their max, not FedAvg's weighted mean of them."""

import json
import os

import dp_accounting
from dp_accounting import rdp
import jax
import numpy as np
import pytest

from dfgm_jax import errors
from dfgm_jax import stage_io
from dfgm_jax.train import dp
from dfgm_jax.train import federated
from launch import train_data
from launch.flower_app import client_app
from launch.flower_app import server_app
from launch.flower_app import settings
from tests.test_flower import _compilation_cache
from tests.test_flower import _leaves_close
from tests.test_flower import _Reply

# The tiny config as test_federated_dp runs it (a one-level network on 16 x
# 16, batches of 4: 2 public, 2 private expected), synthetic slices (each
# site its own 64 patients of one slice: q = 2/64), 2 rounds of 1 step.
RUN_CONFIG = {
    "config": "configs/tiny.py",
    "overrides": (
        "train.reader=synthetic data.image_size=16 "
        "model.overrides.channel_mult=(1,) model.overrides.attention_resolutions=() "
        "model.overrides.base_channels=8 model.overrides.gn_groups=4 "
        "model.overrides.spatial_encoder_channels=4 model.overrides.head_channels=8 "
        "train.batch_size=4 train.tensorboard=False fed.centers=A,B fed.rounds=2 "
        "fed.local_steps=1 fed.engine=sequential dp.enabled=True dp.unit=patient"),
}


def _config(**overrides):
  extra = " ".join(f"{k}={v}" for k, v in overrides.items())
  return settings.load_config(dict(RUN_CONFIG, overrides=(
      RUN_CONFIG["overrides"] + " " + extra)))


def _site(tmp_path, center="A", **extra):
  return settings.site({"center": center, "data-dir": "/unused",
                        "state-dir": str(tmp_path / f"site_{center}"), **extra})


def _rdp_epsilon(q, steps, sigma=1.0, delta=1e-5):
  lib = rdp.RdpAccountant()
  lib.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma)), steps))
  return lib.get_epsilon(delta)


# --- Cheap: the site's seed, its refusals, the server's epsilons -------------------


def test_a_dp_site_draws_its_own_secret_seed_once(tmp_path):
  config = _config()
  site = _site(tmp_path)
  directory = str(tmp_path / "run")
  seed = client_app.dp_seed(site, directory)
  assert client_app.dp_seed(site, directory) == seed  # kept for the run.
  assert oct(os.stat(os.path.join(directory, client_app.DP_SEED_FILE)).st_mode
             & 0o777) == "0o600"
  other = client_app.dp_seed(site, str(tmp_path / "other_run"))
  assert other != seed  # drawn, not derived from the (shared) config.
  assert client_app.dp_seed(_site(tmp_path, **{"dp-seed": "7"}), directory) == 7
  with pytest.raises(errors.ConfigError, match="dp-seed='x'"):
    _site(tmp_path, **{"dp-seed": "x"})
  mine = client_app.site_config(config, seed)
  assert (mine.seed, mine.train.sampler_seed) == (seed, seed)
  assert (config.seed, config.train.sampler_seed) == (0, 0)  # a copy.
  assert mine.dp.to_dict() == config.dp.to_dict()


def test_a_dp_site_refuses_a_run_over_its_budget_before_training(tmp_path):
  # q = 2/64: 2 rounds x 1 step fit epsilon 1.0; 400 rounds do not.
  config = _config(**{"dp.target_epsilon": 1.0, "fed.rounds": 400})
  site = _site(tmp_path, **{"dp-seed": "0"})
  with pytest.raises(errors.ConfigError) as e:
    client_app.run_round(config, site, 1, None, round_index=0)
  msg = str(e.value)
  for part in ("site A refuses round 1:", "config.fed.rounds=400",
               "config.fed.local_steps=1", "config.dp.target_epsilon=1.0",
               "q=0.03125", "at most"):
    assert part in msg, msg
  directory = client_app._state_dir(site, 1)  # pylint: disable=protected-access
  assert not os.path.exists(os.path.join(directory, "opt_state_1.npz"))
  assert not os.path.exists(os.path.join(directory, client_app.DP_LEDGER_FILE))

  # Within the budget, a round the site already released (or one after a
  # round it missed) is refused too: the same noise on other weights.
  config = _config(**{"dp.target_epsilon": 10.0})
  os.makedirs(directory)
  stage_io.write_json(os.path.join(directory, client_app.DP_LEDGER_FILE),
                      {"rounds": 1, "steps": 1, "epsilon": 0.5})
  for round_index in (0, 2):
    with pytest.raises(errors.UserError, match="released 1 round"):
      client_app.run_round(config, site, 1, None, round_index=round_index)
  # The check itself: the epsilon after the round, at the site's own q.
  client = train_data.make_client(config, None, "A", 0)
  accountant = dp.accountant_for(config, client.dp_sampling)
  eps = client_app.dp_check_round(config, "A", accountant,
                                  {"rounds": 1}, round_index=1)
  assert eps == pytest.approx(_rdp_epsilon(2 / 64, 2), rel=1e-12)


def _dp_reply(center, count, value, epsilon):
  """A DP site's reply as the strategy reads it."""
  return _Reply(center, count, value, metrics={settings.EPSILON_KEY: epsilon},
                site={"dp_steps": 4, "dp_q": 0.1})


def test_the_server_logs_each_sites_epsilon_and_their_max():
  rounds = []
  strategy = server_app.SiteFedAvg(
      centers=["A", "B"], min_train_nodes=2, min_available_nodes=2,
      fraction_evaluate=0.0, on_round=lambda *args: rounds.append(args))
  # A holds 3/4 of the examples but spends less: the weighted mean (1.75)
  # would understate B's 4.0.
  _, metrics = strategy.aggregate_train(
      1, [_dp_reply("A", 30, 1.0, 1.0), _dp_reply("B", 10, 5.0, 4.0)])
  assert metrics[settings.EPSILON_KEY] == 4.0
  assert metrics["loss"] == pytest.approx(2.0)  # the others stay weighted.
  [(_, _, per_site, _)] = rounds
  row = server_app._round_row(1, ["A", "B"], per_site, 2.0)  # pylint: disable=protected-access
  assert (row["A/dp_epsilon"], row["B/dp_epsilon"], row["dp_epsilon"]) == (1.0, 4.0, 4.0)
  assert (row["A/dp_steps"], row["B/dp_q"]) == (4, 0.1)
  assert "dp_steps" not in row and "dp_q" not in row  # no mean of those.


def test_a_sites_refusal_stops_the_run_with_its_message():
  strategy = server_app.SiteFedAvg(
      centers=["A", "B"], min_train_nodes=2, min_available_nodes=2,
      fraction_evaluate=0.0, on_round=lambda *args: None)

  class Failed:
    class error:  # pylint: disable=invalid-name
      reason = ("<class 'dfgm_jax.errors.ConfigError'>:<'site B refuses round 3: "
                + "x" * 600 + "'>")

    def has_error(self):
      return True

  with pytest.raises(errors.UserError, match="round 3: 1 site.*site B refuses"):
    strategy.aggregate_train(3, [_dp_reply("A", 30, 1.0, 1.0), Failed()])


# --- Slow: the site's DP rounds equal the in-job engine's ---------------------------


@pytest.mark.slow  # the DP client program's compile (30-60 s on 2 cores).
def test_a_site_dp_round_matches_the_in_job_engine(tmp_path):
  config = _config()
  # The in-job engine with site A as its only client (client index 0, so
  # FedAvg of one is its update): seeds config.seed = sampler_seed = 0.
  with _compilation_cache(str(tmp_path / "xla_cache")):
    clients = [train_data.make_client(config, None, "A", 0)]
    ref = federated.train(config, str(tmp_path / "in_job"), clients,
                          progress=False)
    rows = [json.loads(l) for l in
            (tmp_path / "in_job" / "metrics.jsonl").read_text().splitlines()]

    # Site A with dp_seed 0 (the in-job seeds): two rounds, each in a fresh
    # call as a SuperNode's processes run them.
    def site_rounds(site, run_id):
      _, _, params, ema = federated.init_global(config)
      out = []
      for r in range(config.fed.rounds):
        update, index, _, privacy = client_app.run_round(
            config, site, run_id, settings.to_record(params, ema), round_index=r)
        params, ema = update.params, update.ema
        out.append((update, index, privacy))
      return out

    site = _site(tmp_path, **{"dp-seed": "0"})
    rounds = site_rounds(site, 1)
    secret = site_rounds(_site(tmp_path), 2)  # its own drawn seed.

  [(u1, i1, p1), (u2, i2, p2)] = rounds
  assert i1 == i2 == 0
  _leaves_close(u2.params, ref["params"], atol=1e-6)
  _leaves_close(u2.ema, ref["ema"], atol=1e-6)
  q = clients[0].dp_sampling.sampling_probability
  assert q == 2 / 64
  for r, (privacy, row) in enumerate(zip((p1, p2), rows)):
    assert privacy["dp_steps"] == r + 1 and privacy["dp_q"] == q
    assert privacy["dp_epsilon"] == row["A/dp_epsilon"] == row["dp_epsilon"]
    assert privacy["dp_epsilon"] == pytest.approx(_rdp_epsilon(q, r + 1),
                                                  rel=1e-12)
  assert u2.metrics["loss"] == pytest.approx(rows[1]["A/loss"], rel=1e-5)
  assert u2.metrics["dp_units"] == rows[1]["A/dp_units"]
  ledger = client_app.load_dp_ledger(client_app._state_dir(site, 1))  # pylint: disable=protected-access
  assert (ledger["rounds"], ledger["steps"]) == (2, 2)
  assert ledger["epsilon"] == p2["dp_epsilon"]
  # A site with its own secret seed trains other noise and batches (the
  # server, which knows config.seed, cannot regenerate them) at the same
  # privacy cost.
  assert secret[1][2]["dp_epsilon"] == p2["dp_epsilon"]
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(secret[1][0].params), jax.tree.leaves(u2.params)))
  assert diff > 1e-4
  # A third call for round 2 (a repeated message) is refused.
  with pytest.raises(errors.UserError, match="released 2 round"):
    client_app.run_round(config, site, 1, settings.to_record(u2.params, u2.ema),
                         round_index=1)
  # The reply: epsilon in the MetricRecord, the steps in the site's record.
  content = client_app.reply_content(site, 0, 1, u2, {"train_s": 1.0}, p2)
  [metrics] = content.metric_records.values()
  assert metrics[settings.EPSILON_KEY] == p2["dp_epsilon"]
  assert metrics[settings.COUNT_KEY] == 64 and "dp_clipped_frac" in metrics
  assert content[settings.SITE_KEY]["dp_steps"] == 2
