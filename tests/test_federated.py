"""Federated G1: FedAvg's core (client update, aggregation, FedProx) and the
in-job engine (stacked and sequential clients, per-round checkpoints, resume,
export)."""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dfgm_jax import compile_cache
from dfgm_jax import config_checks
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax.diffusion import denoiser
from dfgm_jax.train import diffusion
from dfgm_jax.train import federated
from launch import train_data
from tests.conftest import ROOT


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  # The engine runs below compile the same client programs several times
  # (each train() compiles its own); a persistent cache compiles each once.
  with compile_cache.enabled(str(tmp_path_factory.mktemp("xla_cache")),
                             min_compile_s=0):
    yield


def _config(**fed):
  config = tiny.get_config()
  # No attention and batches of 4: the same code paths, quicker to compile
  # and run.
  config.model.overrides.attention_resolutions = ()
  config.train.batch_size = 4
  config.train.tensorboard = False
  config.train.checkpoints_to_keep = 5
  for key, value in fed.items():
    setattr(config.fed, key, value)
  return config


def _close(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def _equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- Aggregation -----------------------------------------------------------------


def test_aggregation_weights_params_and_ema_by_private_counts():
  a = {"params": {"w": np.full((2, 3), 1.0, np.float32)},
       "ema": {"w": np.full((2, 3), 10.0, np.float32)}}
  b = {"params": {"w": np.full((2, 3), 5.0, np.float32)},
       "ema": {"w": np.full((2, 3), 50.0, np.float32)}}
  got = federated.aggregate([a, b], counts=[30, 10])
  np.testing.assert_allclose(got["params"]["w"], 0.75 * 1.0 + 0.25 * 5.0, rtol=1e-6)
  np.testing.assert_allclose(got["ema"]["w"], 0.75 * 10.0 + 0.25 * 50.0, rtol=1e-6)
  # The stacked form (the vmapped engine's) gives the same bits.
  _equal(federated.aggregate_stacked(federated.stack([a, b]), [30, 10]), got)
  # Counts, not order or client number, decide: swapping both swaps nothing.
  _equal(federated.aggregate([b, a], counts=[10, 30]), got)
  # One client: its own tree, exactly.
  _equal(federated.aggregate([a], counts=[7]), a)
  with pytest.raises(ValueError, match="positive total"):
    federated.aggregate([a, b], counts=[0, 0])
  with pytest.raises(ValueError, match="counts"):
    federated.aggregate([a, b], counts=[1])


def test_the_fed_section_is_checked_and_its_engines_are_the_librarys():
  assert config_checks.FED_ENGINES == federated.ENGINES
  config_checks.validate(_config())
  for field, value in (("engine", "pod"), ("local_steps", 0), ("fedprox_mu", -1.0)):
    with pytest.raises(errors.ConfigError, match=f"config.fed.{field}="):
      config_checks.validate(_config(**{field: value}))


def test_client_keys_fold_in_round_and_client():
  config = _config()
  keys = {(r, c): tuple(np.asarray(federated.client_key(config, r, c)))
          for r in range(2) for c in range(2)}
  assert len(set(keys.values())) == 4
  root = jax.random.key(config.seed + 1)
  want = jax.random.fold_in(jax.random.fold_in(root, 1), 0)
  assert keys[1, 0] == tuple(np.asarray(jax.random.key_data(want)))


# --- One client, one round = central training; FedProx --------------------------


@pytest.fixture(scope="module")
def one_client():
  """(config, client, graphdef, rest, params, ema, the compiled local program)."""
  config = _config(centers="CBICA", local_steps=3, engine="sequential")
  [client] = train_data.make_clients(config, None)
  graphdef, rest, params, ema = federated.init_global(config)
  opt = federated.stack([federated.init_opt_state(config, params)])
  engine, program, _ = federated.compile_programs(
      config, graphdef, rest, params, ema, opt, [client], config.fed.engine)
  assert engine == "sequential"
  return config, client, graphdef, rest, params, ema, program


def _update(one_client, mu=0.0):
  config, client, _, _, params, ema, program = one_client
  config.fed.fedprox_mu = mu
  return federated.client_update(
      program, config, params, ema, federated.init_opt_state(config, params),
      client.batch_fn, round_index=0, client_index=0,
      num_examples=client.num_examples)


def _distance(a, b) -> float:
  return sum(float(jnp.sum((x - y) ** 2))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_one_client_one_round_is_tau_steps_of_central_training(one_client):
  config, _, graphdef, rest, params, _, _ = one_client
  update = _update(one_client)  # FedProx's path with mu = 0: FedAvg.
  new = federated.aggregate([{"params": update.params, "ema": update.ema}],
                            [update.num_examples])

  # Central training: the trainer's state and step, the client's key, the
  # batches central training on CBICA draws (train_data.make_sampler).
  central_config = _config()
  central_config.train.center = "CBICA"
  sampler = train_data.make_sampler(central_config, None)
  _, _, state = diffusion.init_state(central_config)
  state["key"] = federated.client_key(config, 0, 0)
  step = jax.jit(diffusion.make_train_step(graphdef, rest, central_config))
  losses = []
  for i in range(config.fed.local_steps):
    state, metrics = step(state, jax.tree.map(lambda x: x[None], sampler.batch(i)))
    losses.append(float(metrics["loss"]))
  _close(new["params"], state["params"])
  _close(new["ema"], state["ema"])
  _close(update.opt_state, state["opt_state"])
  assert update.num_examples == 64
  assert update.metrics["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
  # The parameters moved: the comparison is not of two initialisations.
  assert _distance(new["params"], params) > 1e-6


def test_fedprox_pulls_the_client_toward_the_global_parameters(one_client):
  params = one_client[4]
  fedavg = _update(one_client, mu=0.0)
  # Deterministic: the same round again gives the same bits.
  _equal(_update(one_client, mu=0.0).params, fedavg.params)
  # A strong pull (lr x mu = 0.8 before the last step, lr = 4e-4 in the
  # warm-up: four fifths of the way back) shrinks the client's drift from
  # the global parameters.
  prox = _update(one_client, mu=2000.0)
  d0, d_prox = _distance(fedavg.params, params), _distance(prox.params, params)
  assert 0 < d_prox < 0.9 * d0


# --- The engine: stacked = sequential, resume = uninterrupted, export --------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  config = _config(engine="stacked")
  workdir = str(tmp_path_factory.mktemp("fed_full"))
  result = federated.train(config, workdir, train_data.make_clients(config, None),
                           progress=False)
  return config, workdir, result


def test_stacked_and_sequential_engines_agree(uninterrupted, tmp_path):
  config, _, stacked = uninterrupted
  assert stacked["engine"] == "stacked" and stacked["rounds"] == 2
  config = _config(engine="sequential")
  seq = federated.train(config, str(tmp_path), train_data.make_clients(config, None),
                        progress=False)
  assert seq["engine"] == "sequential"
  _close(seq["params"], stacked["params"], atol=1e-5)
  _close(seq["ema"], stacked["ema"], atol=1e-5)
  _close(seq["opt_state"], stacked["opt_state"], atol=1e-5)


def test_a_stopped_run_resumes_to_the_uninterrupted_parameters(uninterrupted, tmp_path):
  config, full_dir, full = uninterrupted
  clients = train_data.make_clients(config, None)
  first = federated.train(config, str(tmp_path), clients, stop_after_rounds=1,
                          progress=False)
  assert first["rounds"] == 1 and first["step"] == config.fed.local_steps
  # A new process would rebuild everything: only the workdir carries over.
  second = federated.train(config, str(tmp_path),
                           train_data.make_clients(config, None), progress=False)
  assert second["rounds"] == 2 and len(second["round_s"]) == 1
  _equal(second["params"], full["params"])
  _equal(second["ema"], full["ema"])
  _equal(second["opt_state"], full["opt_state"])
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [3, 6] and [r["round"] for r in rows] == [1, 2]
  full_rows = [json.loads(l) for l in open(os.path.join(full_dir, "metrics.jsonl"))]
  for key in ("loss", "CBICA/loss", "TCIA/loss", "CBICA/num_examples"):
    assert [r[key] for r in rows] == [r[key] for r in full_rows]


def test_the_workdir_is_one_runs_and_exports_the_global_ema(uninterrupted, tmp_path):
  config, workdir, result = uninterrupted
  # Another defining setting is another run: refused, naming the field.
  other = _config(engine="stacked", local_steps=4)
  with pytest.raises(errors.RunMismatch, match="fed.local_steps"):
    federated.train(other, workdir, train_data.make_clients(other, None),
                    progress=False)
  # The export reads the global EMA of the last round.
  out, step = model_io.export_workdir(workdir, tiny.get_config(),
                                      str(tmp_path / "model"))
  assert step == 2 * config.fed.local_steps
  _, arrays = model_io.read_export(out)
  want = model_io.flatten(result["ema"])
  assert sorted(arrays) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(arrays[name], value)


# --- The binary: real slices, a killed run, the export ------------------------------


def _binary(workdir, data_dir, *extra):
  return [sys.executable, "-m", "launch.train_federated", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--data_dir={data_dir}",
          "--config.train.reader=grain", "--config.fed.centers=",
          "--config.fed.local_steps=4", "--config.fed.rounds=3",
          "--config.train.tensorboard=False", *extra]


def _env():
  cache = os.path.join(tempfile.gettempdir(), f"dfgm_test_fed_cache_{os.getuid()}")
  return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
              JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _ema_of(workdir):
  d = denoiser.Denoiser.load(str(workdir), tiny.get_config())
  return d.step, model_io.flatten(d.params)


@pytest.mark.slow
def test_the_binary_on_phantom_slices_survives_a_kill_and_exports(
    preprocessed_2020, tmp_path):
  data_dir, manifest = preprocessed_2020
  ref = subprocess.run(_binary(tmp_path / "ref", data_dir), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  # Both private centers of the slices are clients, with their slice counts.
  for center in ("CBICA", "TCIA"):
    assert f"'{center}': {manifest['splits'][center + '_train']['num_slices']}" \
        in ref.stdout
  victim = subprocess.Popen(_binary(tmp_path / "run", data_dir), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  first = tmp_path / "run" / "checkpoints" / "4"
  deadline = time.time() + 600
  while not first.exists() and victim.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  victim.kill()  # SIGKILL after round 1 was saved: no chance to clean up.
  victim.wait()
  assert first.exists() and not (first.parent / "12").exists()
  resumed = subprocess.run(_binary(tmp_path / "run", data_dir), cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").open()]
  assert [r["round"] for r in rows] == [1, 2, 3]
  step_a, a = _ema_of(tmp_path / "ref")
  step_b, b = _ema_of(tmp_path / "run")
  assert step_a == step_b == 12
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
  exported = subprocess.run(
      [sys.executable, "-m", "launch.export_model",
       f"--model_dir={tmp_path / 'run'}", f"--out={tmp_path / 'model'}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert exported.returncode == 0, exported.stderr[-3000:]
  record, arrays = model_io.read_export(str(tmp_path / "model"))
  assert record["step"] == 12
  for name in a:
    np.testing.assert_array_equal(arrays[name], b[name])
