"""DP-SGD in the federated engine: each client's DP sampler over its own
patients, its own epsilon per round, the budget refused naming the client."""

import json

import dp_accounting
from dp_accounting import rdp
import jax
import numpy as np
import pytest

from configs import tiny
from dfgm_jax import errors
from dfgm_jax.train import dp
from dfgm_jax.train import federated
from launch import train_data


def _config(engine="sequential", **dp_fields):
  config = tiny.get_config()
  config.dp.enabled = True
  config.dp.unit = "patient"
  for k, v in dp_fields.items():
    setattr(config.dp, k, v)
  # A one-level network on 16 x 16 and batches of 4 (2 public, 2 private
  # expected): the per-unit (vmapped) step compiles in seconds on 2 cores.
  config.data.image_size = 16
  o = config.model.overrides
  o.channel_mult, o.attention_resolutions, o.base_channels = (1,), (), 8
  o.gn_groups, o.spatial_encoder_channels, o.head_channels = 4, 4, 8
  config.train.batch_size = 4
  config.train.tensorboard = False
  config.fed.centers = "A,B"
  config.fed.rounds, config.fed.local_steps = 1, 1
  config.fed.engine = engine
  return config


def _client(config, name, index, num_patients, per_patient):
  """A client whose DP sampler is over num_patients patients (its own q)."""
  rng = np.random.default_rng(index)
  n, size = num_patients * per_patient, config.data.image_size
  tumor = {"image": rng.uniform(-1, 1, (n, size, size, 1)).astype(np.float32),
           "mask": (rng.random((n, size, size, 1)) > 0.7).astype(np.float32)}
  healthy = {"image": rng.uniform(-1, 1, (8, size, size, 1)).astype(np.float32)}
  ids = [f"{name}{i // per_patient}" for i in range(n)]
  sampler = dp.make_sampler(config, healthy, tumor, ids, process_index=0,
                            process_count=1, slot_multiple=1)
  return federated.Client(name, sampler.batch, n)


def _rdp_epsilon(q, steps, sigma=1.0, delta=1e-5):
  lib = rdp.RdpAccountant()
  lib.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma)), steps))
  return lib.get_epsilon(delta)


@pytest.mark.slow  # 45-70 s of compile; .ci/run runs it after the default suite.
def test_a_dp_round_logs_each_clients_epsilon(tmp_path):
  config = _config()
  # A: 3 patients of 2 slices (q = 2/3, 3 slots); B: 5 patients (q = 2/5,
  # 5 slots): A is padded to B's slots. The sequential engine: its DP
  # program compiles faster than the stacked one (40 s against 52 s here).
  clients = [_client(config, "A", 0, 3, 2), _client(config, "B", 1, 5, 1)]
  qs = [c.batch_fn.__self__.dp_sampling.sampling_probability for c in clients]
  assert qs == [2 / 3, 2 / 5]
  slots = [c.batch_fn.__self__.dp_sampling.max_units for c in clients]
  assert slots[0] < slots[1]
  result = federated.train(config, str(tmp_path), clients, progress=False)
  rows = [json.loads(l) for l in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1]
  row = rows[0]
  for c, q in zip(clients, qs):
    sampling = c.batch_fn.__self__.dp_sampling
    assert sampling.max_units == max(slots)  # padded to the largest.
    assert sampling.sampling_probability == q  # the padding keeps q.
    assert row[f"{c.name}/dp_epsilon"] == dp.accountant_for(config, sampling).epsilon(1)
    assert row[f"{c.name}/dp_epsilon"] == _rdp_epsilon(q, 1)
    assert 0 <= row[f"{c.name}/dp_units"] <= max(slots)
    assert np.isfinite(row[f"{c.name}/loss"])
  assert row["A/dp_epsilon"] > row["B/dp_epsilon"]  # the larger q spends more.
  assert row["dp_epsilon"] == row["A/dp_epsilon"]
  assert result["metrics"]["dp_epsilon"] == row["dp_epsilon"]
  leaves = jax.tree.leaves(result["params"])
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_a_run_over_budget_is_refused_naming_the_client(tmp_path):
  # B (2 patients, q = 1) overspends first; A (50 patients) would not.
  config = _config()
  config.fed.rounds, config.dp.target_epsilon = 20, 30.0
  clients = [_client(config, "A", 0, 50, 1), _client(config, "B", 1, 2, 1)]
  ok = federated.dp_accountants(config, federated.dp_clients(clients[:1]))
  assert ok[0].epsilon(20) <= 30.0 < ok[0].epsilon(10**6)
  with pytest.raises(errors.ConfigError) as e:
    federated.train(config, str(tmp_path / "w"), clients, progress=False)
  msg = str(e.value)
  for name in ("client B:", "config.fed.rounds=20", "config.fed.local_steps=1",
               "config.dp.target_epsilon=30.0", "at most"):
    assert name in msg, msg
  assert "client A" not in msg
  assert not (tmp_path / "w").exists()  # refused before touching the workdir.
  # Batches from a non-DP sampler are refused too, naming the client.
  plain = federated.Client("C", lambda step: {}, 4)
  with pytest.raises(errors.ConfigError, match="client C's batches"):
    federated.train(config, str(tmp_path / "w"), [plain], progress=False)


def test_make_clients_builds_dp_samplers_per_center():
  config = _config()
  config.dp.unit = "example"
  clients = train_data.make_clients(config, None)  # synthetic reader.
  assert [c.name for c in clients] == ["A", "B"]
  samplers = [c.batch_fn.__self__ for c in clients]
  assert all(isinstance(s, dp.PoissonSampler) for s in samplers)
  assert [c.dp_sampling for c in clients] == [s.dp_sampling for s in samplers]
  assert [s.seed for s in samplers] == [0, 1]  # sampler_seed + client index.
  assert samplers[0].dp_sampling.num_units == 64
  assert set(clients[0].batch_fn(0)) == {"image", "mask", "is_tumor",
                                         "dp_image", "dp_mask", "dp_valid"}
  # Each client draws from its own tumor slices.
  assert not np.array_equal(samplers[0].tumor_image, samplers[1].tumor_image)
  config.dp.enabled = False
  plain = train_data.make_clients(config, None)
  assert all(c.dp_sampling is None for c in plain)
  assert "dp_image" not in plain[0].batch_fn(0)
