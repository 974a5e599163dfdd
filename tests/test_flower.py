"""The Flower app (federated engine 2, launch/flower_app): its wire format and
the sites' optimizer state between rounds; a SuperLink and two SuperNodes on
localhost (Flower's deployment engine) running two rounds on the phantom
slices end with the in-job engine's parameters, EMA and optimizer states."""

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import psutil
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from jax.experimental.compilation_cache import compilation_cache

from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax.diffusion import denoiser
from dfgm_jax.train import federated
from dfgm_jax.train import loop
from launch import train_data
from launch.flower_app import client_app
from launch.flower_app import secure
from launch.flower_app import server_app
from launch.flower_app import settings
from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)
# The tiny config as test_federated runs it (no attention, batches of 4),
# reading the phantom slices; two rounds of two local steps; the in-job
# engine's sequential program (the one a site runs).
RUN_CONFIG = {
    "config": "configs/tiny.py",
    "overrides": ("train.reader=grain train.batch_size=4 train.tensorboard=False "
                  "model.overrides.attention_resolutions=() fed.rounds=2 "
                  "fed.local_steps=2 fed.centers=CBICA,TCIA "
                  "fed.engine=sequential train.checkpoints_to_keep=5"),
}


def _leaves_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


# --- The pieces: run config, wire format, the optimizer state on disk -------------


def test_the_run_config_is_the_binaries_config_flags():
  config = settings.load_config(RUN_CONFIG)
  assert (config.fed.local_steps, config.train.batch_size) == (2, 4)
  assert config.model.overrides.attention_resolutions == ()
  for overrides, field in (("train.nope=1", "no field 'nope'"),
                           ("fed.centers=", "config.fed.centers=''"),
                           ("fed.centers=CBICA,CBICA", "appears twice"),
                           ("fed.local_steps=0", "config.fed.local_steps=0")):
    with pytest.raises(errors.ConfigError, match=field):
      settings.load_config({"config": "configs/tiny.py", "overrides": overrides})
  with pytest.raises(errors.ConfigError, match="center is missing"):
    settings.site({"data_dir": "/x", "state_dir": "/y"})
  # A site refuses a center the run does not name, or slices it lacks,
  # before any work.
  for center, data_dir, message in (("TCGA", "/nonexistent", "not one of"),
                                    ("TCIA", "/nonexistent", "no such folder")):
    site = settings.site({"center": center, "data_dir": data_dir,
                          "state_dir": "/nonexistent"})
    with pytest.raises(errors.UserError, match=message):
      client_app.run_round(config, site, 1, None, round_index=0)


def test_the_wire_format_and_the_sites_optimizer_state(tmp_path):
  config = settings.load_config(RUN_CONFIG)
  _, _, params, ema = federated.init_global(config)
  ema = jax.tree.map(lambda x: x + 1.0, ema)
  record = settings.to_record(params, ema)
  assert len(record) == 2 * len(jax.tree.leaves(params))
  got_params, got_ema = settings.from_record(record, params)
  _leaves_close(got_params, params, atol=0)
  _leaves_close(got_ema, ema, atol=0)
  del record[next(iter(record.keys()))]
  with pytest.raises(model_io.ModelError, match="missing"):
    settings.from_record(record, params)

  opt = federated.init_opt_state(config, params)
  opt = jax.tree.map(lambda x: x + 2, opt)
  template = jax.eval_shape(lambda p: federated.init_opt_state(config, p), params)
  for rounds in (1, 2, 3):
    client_app.save_opt_state(str(tmp_path), rounds, opt)
  # The last two rounds' files stay (a message delivered twice finds its input).
  assert sorted(os.listdir(tmp_path)) == ["opt_state_2.npz", "opt_state_3.npz"]
  _leaves_close(client_app.load_opt_state(str(tmp_path), 3, template), opt, atol=0)
  with pytest.raises(errors.UserError, match="no optimizer state of round 1"):
    client_app.load_opt_state(str(tmp_path), 1, template)


class _Reply:
  """What the strategy reads of a site's reply message."""

  def __init__(self, center, count, value):
    self.content = RecordDict({
        settings.ARRAYS_KEY: ArrayRecord({
            "params/w": Array(np.full(3, value, np.float32)),
            "ema/w": Array(np.full(3, 10 * value, np.float32))}),
        "metrics": MetricRecord({settings.COUNT_KEY: count, "loss": value}),
        settings.SITE_KEY: ConfigRecord({"center": center, "train_s": 1.5})})

  def has_error(self):
    return False


def test_the_server_weights_by_private_counts_and_needs_every_site():
  rounds = []
  strategy = server_app.SiteFedAvg(
      centers=["CBICA", "TCIA"], min_train_nodes=2, min_available_nodes=2,
      fraction_evaluate=0.0, on_round=lambda *args: rounds.append(args))
  arrays, metrics = strategy.aggregate_train(
      1, [_Reply("TCIA", 10, 5.0), _Reply("CBICA", 30, 1.0)])
  # Params and EMA alike, n_k / sum n: as federated.aggregate.
  want = federated.aggregate(
      [{"params": {"w": np.full(3, 1.0, np.float32)},
        "ema": {"w": np.full(3, 10.0, np.float32)}},
       {"params": {"w": np.full(3, 5.0, np.float32)},
        "ema": {"w": np.full(3, 50.0, np.float32)}}], counts=[30, 10])
  np.testing.assert_allclose(arrays["params/w"].numpy(), want["params"]["w"],
                             rtol=1e-7)
  np.testing.assert_allclose(arrays["ema/w"].numpy(), want["ema"]["w"], rtol=1e-7)
  assert metrics["loss"] == pytest.approx(0.75 * 1.0 + 0.25 * 5.0)
  [(round_index, _, per_site, _)] = rounds
  assert round_index == 1
  assert per_site["CBICA"] == {settings.COUNT_KEY: 30.0, "loss": 1.0, "train_s": 1.5}
  row = server_app._round_row(1, ["CBICA", "TCIA"], per_site, 2.0)  # pylint: disable=protected-access
  assert row["CBICA/num_examples"] == 30 and row["loss"] == pytest.approx(3.0)
  # A missing site, or one center twice, stops the run.
  for replies in ([_Reply("CBICA", 30, 1.0)],
                  [_Reply("CBICA", 30, 1.0), _Reply("CBICA", 10, 5.0)]):
    with pytest.raises(errors.UserError, match="sites that answered"):
      strategy.aggregate_train(2, replies)


# --- The deployment engine on localhost --------------------------------------------


class _Processes:
  """Processes started in their own sessions; stop() ends them and every
  process they started (the SuperLink's and SuperNodes' app processes)."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self.started = []

  def start(self, name, args, env):
    log = open(os.path.join(self.log_dir, f"{name}.log"), "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=self.log_dir)
    self.started.append((name, proc, log))
    return proc

  def logs(self):
    text = []
    for name, _, log in self.started:
      log.flush()
      with open(log.name) as f:
        text.append(f"--- {name}\n{f.read()[-4000:]}")
    return "\n".join(text)

  def stop(self):
    tree = []
    for _, proc, _ in self.started:
      try:
        tree += [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(
            recursive=True)
      except psutil.NoSuchProcess:
        pass
    for p in tree:
      try:
        p.send_signal(signal.SIGTERM)
      except psutil.NoSuchProcess:
        pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
      try:
        p.kill()
      except psutil.NoSuchProcess:
        pass
    psutil.wait_procs(alive, timeout=5)
    for _, proc, log in self.started:
      proc.wait(timeout=5)
      log.close()


def _free_ports(n):
  """n ports free now (bound together, so distinct; released for the servers)."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _wait_for_port(port, proc, timeout=60):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise AssertionError(f"nothing listens on port {port}")


@contextlib.contextmanager
def _compilation_cache(cache_dir):
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    compilation_cache.reset_cache()


def _env(flwr_home, cache_dir):
  env = dict(os.environ, FLWR_HOME=flwr_home, FLWR_TELEMETRY_ENABLED="0",
             FLWR_DISABLE_UPDATE_CHECK="1",
             FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
             TF_CPP_MIN_LOG_LEVEL="3", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("PYTHONPATH", None)  # the apps run from the FAB the SuperLink sent.
  os.makedirs(flwr_home, exist_ok=True)
  return env


def _flower_run(tmp_path, data_dir, **extra):
  """Runs the app on a SuperLink and two SuperNodes; returns (server
  workdir, the sites' state dirs, seconds of `flwr run`). extra: more run
  config."""
  procs = _Processes(str(tmp_path))
  cache = str(tmp_path / "xla_cache")
  link_port, *node_ports = _free_ports(3)
  workdir = str(tmp_path / "server")
  states = {c: str(tmp_path / f"site_{c}") for c in ("CBICA", "TCIA")}
  try:
    link = procs.start("superlink", [
        os.path.join(BIN, "flower-superlink"), "--insecure", "--host",
        "127.0.0.1", "--port", str(link_port),
        "--disable-runtime-dependency-installation"],
        _env(str(tmp_path / "home_link"), cache))
    _wait_for_port(link_port, link)
    for (center, state), port in zip(states.items(), node_ports):
      node_config = (f'center="{center}" data_dir="{data_dir}" '
                     f'state_dir="{state}" cache_dir="{cache}"')
      procs.start(f"supernode_{center}", [
          os.path.join(BIN, "flower-supernode"), "--insecure", "--superlink",
          f"127.0.0.1:{link_port}", "--port", str(port), "--node-config",
          node_config], _env(str(tmp_path / f"home_{center}"), cache))
    cli_home = str(tmp_path / "home_cli")
    env = _env(cli_home, cache)
    with open(os.path.join(cli_home, "config.toml"), "w") as f:
      f.write(f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
              f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    run_config = tmp_path / "run_config.toml"
    run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {
        **RUN_CONFIG, "workdir": workdir, "round-timeout": 600,
        **extra}.items()))
    start = time.perf_counter()
    run = subprocess.run(
        [os.path.join(BIN, "flwr"), "run", ROOT, "local-test", "--stream",
         "--run-config", str(run_config)], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    # `flwr run` can exit 0 on a failed run: the workdir says whether it ran.
    done = os.path.join(workdir, "flower_run.json")
    assert run.returncode == 0 and os.path.exists(done), (
        f"flwr run exit {run.returncode}\n{run.stdout[-4000:]}\n"
        f"{run.stderr[-4000:]}\n{procs.logs()}")
    return workdir, states, seconds
  finally:
    procs.stop()


@pytest.mark.slow  # about 75 s; .ci/run runs it after the default suite.
def test_two_supernodes_on_localhost_match_the_in_job_engine(
    preprocessed_2020, tmp_path):
  data_dir, manifest = preprocessed_2020
  # The in-job engine first, with the same config: its client program goes
  # into the compilation cache the sites then read (the same program, so
  # their first round loads it instead of compiling it twice at once).
  config = settings.load_config(RUN_CONFIG)
  start = time.perf_counter()
  clients = train_data.make_clients(config, data_dir)
  with _compilation_cache(str(tmp_path / "xla_cache")):
    ref = federated.train(config, str(tmp_path / "in_job"), clients,
                          progress=False)
  in_job_s = time.perf_counter() - start
  workdir, states, flower_s = _flower_run(tmp_path, data_dir)
  record = json.load(open(os.path.join(workdir, "flower_run.json")))
  print(f"flwr run {flower_s:.1f}s, rounds {record['round_s']}; in-job "
        f"{in_job_s:.1f}s, compile {ref['compile_s']:.1f}s, rounds {ref['round_s']}")
  assert record["rounds"] == 2 and record["clients"] == ["CBICA", "TCIA"]

  # The server's last checkpoint: the global params and EMA after round 2.
  checkpointer = loop.make_checkpointer(workdir, config.train)
  try:
    step, state, meta = checkpointer.restore_latest(
        {"params": ref["params"], "ema": ref["ema"]})
  finally:
    checkpointer.close()
  assert step == 4 and meta["round"] == 2 and meta["engine"] == "flower"
  counts = [manifest["splits"][f"{c}_train"]["num_slices"] for c in ("CBICA", "TCIA")]
  assert meta["num_examples"] == [c.num_examples for c in clients] == counts
  # FedAvg in Flower (numpy) and in the job (XLA) sum in float32.
  _leaves_close(state["params"], ref["params"], atol=1e-5)
  _leaves_close(state["ema"], ref["ema"], atol=1e-5)

  # Each site kept its own AdamW state across the two processes of its rounds.
  template = jax.eval_shape(lambda p: federated.init_opt_state(config, p),
                            ref["params"])
  for index, center in enumerate(("CBICA", "TCIA")):
    [site_dir] = glob.glob(os.path.join(states[center], "run-*", center))
    _leaves_close(client_app.load_opt_state(site_dir, 2, template),
                  federated.unstack(ref["opt_state"], index), atol=1e-5)

  # The per-round rows: the sites' losses are the in-job clients'.
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  ref_rows = [json.loads(l) for l in open(tmp_path / "in_job" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [2, 4]
  for row, ref_row in zip(rows, ref_rows):
    for key in ("loss", "CBICA/loss", "TCIA/loss", "CBICA/num_examples"):
      assert row[key] == pytest.approx(ref_row[key], rel=1e-4), key

  # launch.export_model / Denoiser.load read the server's workdir.
  loaded = denoiser.Denoiser.load(workdir, config)
  assert loaded.step == 4
  _leaves_close(loaded.params, state["ema"], atol=0)


@pytest.mark.slow  # 161 s (flwr run 95 s): four messages a round to each site.
def test_two_supernodes_with_secure_aggregation(preprocessed_2020, tmp_path):
  data_dir, _ = preprocessed_2020
  config = settings.load_config(RUN_CONFIG)
  clients = train_data.make_clients(config, data_dir)
  with _compilation_cache(str(tmp_path / "xla_cache")):
    ref = federated.train(config, str(tmp_path / "in_job"), clients,
                          progress=False)
  counts = [c.num_examples for c in clients]
  max_weight = 100.0
  assert max(counts) <= max_weight
  workdir, _, flower_s = _flower_run(
      tmp_path, data_dir, **{"secure-aggregation": True,
                             "secagg-max-weight": max_weight})
  record = json.load(open(os.path.join(workdir, "flower_run.json")))
  assert record["secure_aggregation"] and record["rounds"] == 2
  def restore(directory, step, with_opt):
    target = {"params": ref["params"], "ema": ref["ema"]}
    if with_opt:
      target["opt_state"] = ref["opt_state"]
    checkpointer = loop.make_checkpointer(directory, config.train)
    try:
      return checkpointer.restore(step, target)
    finally:
      checkpointer.close()

  def max_error(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for tree in ("params", "ema")
               for x, y in zip(jax.tree.leaves(a[tree]), jax.tree.leaves(b[tree])))

  # SecAgg+ quantizes each site's n_k-weighted values (2^22 levels over
  # +-8, stochastic rounding): round 1's aggregate (both sites trained from
  # the same global weights) is at most `bound` off the in-job one.
  bound = secure.error_bound(2, sum(counts), max_weight=max_weight)
  (one, meta1), (ref_one, _) = (restore(workdir, 2, False),
                                restore(str(tmp_path / "in_job"), 2, True))
  assert meta1["num_examples"] == counts
  err1 = max_error(one, ref_one)
  # Round 2 trains on round 1's perturbed weights: AdamW's normalised steps
  # amplify the perturbation (measured 6.7e-4 to 8.1e-4, bound 5.7e-5).
  (two, _), (ref_two, _) = (restore(workdir, 4, False),
                            restore(str(tmp_path / "in_job"), 4, True))
  err2 = max_error(two, ref_two)
  print(f"secure aggregation: flwr run {flower_s:.1f}s, rounds "
        f"{record['round_s']}; max error round 1 {err1:.3g}, round 2 "
        f"{err2:.3g}, bound {bound:.3g}")
  assert 0 < err1 <= bound
  assert err2 <= 100 * bound
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["CBICA/loss"]) and r["TCIA/num_examples"] == counts[1]
             for r in rows)
