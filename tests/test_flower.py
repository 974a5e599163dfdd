"""The Flower app (federated engine 2, launch/flower_app): its wire format and
the sites' optimizer state between rounds; the server's resume decision and
the sites' state keyed by the run key (not Flower's run id); a SuperLink and
two SuperNodes on localhost (Flower's deployment engine) running two rounds
on the phantom slices end with the in-job engine's parameters, EMA and
optimizer states, also when the run is stopped after round 1 and resumed by
a new `flwr run` on a restarted SuperLink and SuperNodes."""

import contextlib
import glob
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat
from flwr.supercore.task_identity import TaskIdentity

from dfgm_jax import compile_cache
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax.diffusion import denoiser
from dfgm_jax.train import federated
from dfgm_jax.train import loop
from launch import train_data
from launch.flower_app import client_app
from launch.flower_app import runner
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


@contextlib.contextmanager
def _flower_records(caplog):
  """caplog also gets Flower's logger's records (the app stops them from
  propagating to the root logger: logs.one_stream)."""
  flwr_logger = logging.getLogger("flwr")
  flwr_logger.addHandler(caplog.handler)
  try:
    yield
  finally:
    flwr_logger.removeHandler(caplog.handler)


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
    settings.site({"data-dir": "/x", "state-dir": "/y"})
  # A site refuses a center the run does not name, or slices it lacks,
  # before any work.
  for center, data_dir, message in (("TCGA", "/nonexistent", "not one of"),
                                    ("TCIA", "/nonexistent", "no such folder")):
    site = settings.site({"center": center, "data-dir": data_dir,
                          "state-dir": "/nonexistent"})
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
  """What the strategy reads of a site's reply message; `metrics` and `site`
  add entries to its MetricRecord and site ConfigRecord (a DP site's)."""

  def __init__(self, center, count, value, metrics=None, site=None):
    self.content = RecordDict({
        settings.ARRAYS_KEY: ArrayRecord({
            "params/w": Array(np.full(3, value, np.float32)),
            "ema/w": Array(np.full(3, 10 * value, np.float32))}),
        "metrics": MetricRecord({settings.COUNT_KEY: count, "loss": value,
                                 **(metrics or {})}),
        settings.SITE_KEY: ConfigRecord({"center": center, "train_s": 1.5,
                                         **(site or {})})})

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


# --- Resume: the server's decision, the sites' state keyed by the run key ---------


def _save_round(workdir, config, round_index, params, ema, engine="flower"):
  """A server checkpoint after `round_index` rounds, as server_app.run saves."""
  checkpointer = loop.make_checkpointer(workdir, config.train)
  try:
    meta = {"config": json.loads(config.to_json_best_effort()),
            "round": round_index, "clients": ["CBICA", "TCIA"]}
    if engine:
      meta["engine"] = engine
    checkpointer.save(round_index * config.fed.local_steps,
                      {"params": params, "ema": ema}, meta, force=True)
  finally:
    checkpointer.close()


def _resume_point(workdir, config, **kwargs):
  checkpointer = loop.make_checkpointer(workdir, config.train)
  try:
    return server_app.resume_point(config, workdir, checkpointer, **kwargs)
  finally:
    checkpointer.close()


def test_the_server_resumes_after_its_last_checkpoint(tmp_path, caplog):
  config = settings.load_config(RUN_CONFIG)  # 2 rounds of 2 steps.
  _, _, params, ema = federated.init_global(config)
  workdir = str(tmp_path / "server")
  fresh = _resume_point(workdir, config)
  assert fresh.rounds_done == 0
  _leaves_close(fresh.params, params, atol=0)
  _leaves_close(fresh.ema, ema, atol=0)
  # The run key: kept in the workdir for the run's next `flwr run`; another
  # workdir (or an overwrite) gets another, so runs never share site state.
  assert len(fresh.run_key) == 32
  assert _resume_point(workdir, config).run_key == fresh.run_key
  assert _resume_point(str(tmp_path / "other"), config).run_key != fresh.run_key
  key_file = os.path.join(workdir, server_app.RUN_KEY_FILE)
  with open(key_file) as f:
    assert json.load(f)["run_key"] == fresh.run_key

  # Stopped after round 1: round 2 starts from round 1's weights, same key.
  one = (jax.tree.map(lambda x: x + 1.0, params), jax.tree.map(lambda x: x - 1.0, ema))
  _save_round(workdir, config, 1, *one)
  start = _resume_point(workdir, config)
  assert (start.rounds_done, start.run_key) == (1, fresh.run_key)
  _leaves_close(start.params, one[0], atol=0)
  _leaves_close(start.ema, one[1], atol=0)
  # overwrite=true (the claim has deleted the run's checkpoints): a new key,
  # kept for the new run.
  third = str(tmp_path / "third")
  first_key = _resume_point(third, config).run_key
  new_key = _resume_point(third, config, overwrite=True).run_key
  assert new_key != first_key and _resume_point(third, config).run_key == new_key

  # All rounds done: a rerun is a no-op that says so (no site contacted: no
  # grid) and records the finished run.
  _save_round(workdir, config, 2, *one)
  caplog.set_level(logging.INFO, logger="flwr")  # what `flwr run` streams.
  with _flower_records(caplog):
    result = server_app.run(config, workdir, grid=None)
  assert (result["rounds"], result["finished"], result["round_s"]) == (2, True, [])
  assert "already holds 2 rounds (config.fed.rounds=2); nothing to do" in caplog.text
  with open(os.path.join(workdir, server_app.DONE_FILE)) as f:
    done = json.load(f)
  assert (done["rounds"], done["resumed_after"]) == (2, 2)
  # Another config in the workdir is refused (the claim), as before.
  other = settings.load_config(dict(RUN_CONFIG, overrides=RUN_CONFIG["overrides"]
                                    + " train.batch_size=2"))
  with pytest.raises(errors.RunMismatch):
    server_app.run(other, workdir, grid=None)

  # Only the Flower engine's checkpoints resume (the in-job engine's hold the
  # clients' optimizer states, which the sites lack), and only with the run
  # key that finds the sites' states.
  in_job = str(tmp_path / "in_job")
  _save_round(in_job, config, 1, params, ema, engine=None)
  with pytest.raises(errors.UserError, match="in-job engine"):
    _resume_point(in_job, config)
  os.remove(key_file)
  with pytest.raises(errors.UserError, match="no flower_run_key.json"):
    _resume_point(workdir, config)


class _Grid:
  """The two SuperNodes a strategy sends its messages to."""

  def get_node_ids(self):
    return [11, 12]


def test_a_resumed_run_asks_the_sites_its_own_round_under_its_run_key(
    tmp_path, monkeypatch):
  # Messages are made inside a Flower run (a new id for every `flwr run`).
  for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
    monkeypatch.setattr(TaskIdentity, name, value)
  rounds = []
  strategy = server_app.SiteFedAvg(
      centers=["CBICA", "TCIA"], first_round=2, min_train_nodes=2,
      min_available_nodes=2, fraction_evaluate=0.0,
      on_round=lambda *args: rounds.append(args))
  messages = list(strategy.configure_train(
      1, ArrayRecord({"params/w": Array(np.zeros(3, np.float32))}),
      ConfigRecord({settings.RUN_KEY: "0123abcd"}), _Grid()))
  assert len(messages) == 2
  for msg in messages:  # Flower's round 1 is the run's round 2.
    assert int(msg.content["config"]["server-round"]) == 2
    assert client_app.run_key(msg.content) == "0123abcd"
  replies = [_Reply("CBICA", 30, 1.0), _Reply("TCIA", 10, 5.0)]
  for reply in replies:
    reply.content[settings.SITE_KEY]["round"] = 2
  strategy.aggregate_train(1, replies)
  assert [r[0] for r in rounds] == [2]
  replies[1].content[settings.SITE_KEY]["round"] = 1
  with pytest.raises(errors.UserError, match=r"sites \['TCIA'\] answered another"):
    strategy.aggregate_train(1, replies)
  # SecAgg+'s FitIns carries them too.
  fitins = FitIns(ndarrays_to_parameters([np.ones(2, np.float32)]),
                  {"server-round": 2, settings.RUN_KEY: "0123abcd"})
  arrays, round_index, key = secure.legacy_fit(
      recorddict_compat.fitins_to_recorddict(fitins, keep_input=True))
  assert (round_index, key) == (1, "0123abcd")
  np.testing.assert_array_equal(arrays[0], np.ones(2, np.float32))

  # The site keeps its state under the run key, whatever Flower's run id.
  site = settings.site({"center": "TCIA", "data-dir": "/unused",
                        "state-dir": str(tmp_path / "site")})
  assert client_app._state_dir(site, "0123abcd") == str(  # pylint: disable=protected-access
      tmp_path / "site" / "run-0123abcd" / "TCIA")
  for bad in ("../x", "a/b", "", "x" * 65):
    with pytest.raises(errors.UserError, match="run key"):
      client_app._state_dir(site, bad)  # pylint: disable=protected-access
  with pytest.raises(errors.UserError, match="no run key"):
    client_app.run_key(RecordDict({"config": ConfigRecord({"server-round": 2})}))
  # Round 2 of a run the site has no state of under this key is refused
  # before training, naming where it looked.
  config = settings.load_config(dict(RUN_CONFIG, overrides=RUN_CONFIG["overrides"]
                                     + " train.reader=synthetic"))
  _, _, params, ema = federated.init_global(config)
  opt = federated.init_opt_state(config, params)
  client_app.save_opt_state(client_app._state_dir(site, "0123abcd"), 1, opt)  # pylint: disable=protected-access
  with pytest.raises(errors.UserError, match="run-99ff/TCIA/opt_state_1.npz: no "
                     "optimizer state of round 1"):
    client_app.run_round(config, site, "99ff", settings.to_record(params, ema),
                         round_index=1)


class _Accountant:
  def epsilon(self, steps):
    return 0.25 * steps


def test_a_dp_site_repeats_its_last_round_only_for_the_same_weights():
  config = settings.load_config(RUN_CONFIG)  # 2 local steps a round.
  weights = ArrayRecord({"params/w": Array(np.arange(3, dtype=np.float32)),
                         "ema/w": Array(np.ones(3, np.float32))})
  digest = client_app.arrays_digest(weights)
  # SecAgg+'s list of the same weights has the same digest; others another.
  assert client_app.arrays_digest([np.arange(3, dtype=np.float32),
                                   np.ones(3, np.float32)]) == digest
  other = client_app.arrays_digest([np.arange(3, dtype=np.float32),
                                    np.full(3, 1.5, np.float32)])
  assert other != digest
  ledger = {"rounds": 1, "steps": 2, "epsilon": 0.5, "input_sha256": digest}
  check = lambda r, d: client_app.dp_check_round(  # noqa: E731
      config, "TCIA", _Accountant(), ledger, round_index=r, input_digest=d)
  # Round 1 again from the same global weights (a server that restarted
  # before its checkpoint): the same noise and answer, the same epsilon.
  assert check(0, digest) == 0.5
  assert check(1, other) == 1.0  # the next round, accounted on.
  for round_index, d in ((0, other), (0, None), (2, digest)):
    with pytest.raises(errors.UserError, match="released 1 round"):
      check(round_index, d)


# --- The deployment engine on localhost --------------------------------------------


class _Processes:
  """Processes started in their own sessions; stop() ends them and every
  process they started (the SuperLink's and SuperNodes' app processes)."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self.started = []

  def start(self, name, args, env, cwd=None):
    log = open(os.path.join(self.log_dir, f"{name}.log"), "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=cwd or self.log_dir)
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
    runner.stop_process_trees([proc.pid for _, proc, _ in self.started], grace_s=10)
    for _, proc, log in self.started:
      proc.wait(timeout=5)
      log.close()


def _wait_for_port(port, proc, timeout=60):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise AssertionError(f"nothing listens on port {port}")


def _compilation_cache(cache_dir):
  return compile_cache.enabled(cache_dir, min_compile_s=0)


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


def _flower_run(tmp_path, data_dir, *, stop_after_round=None, log_dir=None,
                **extra):
  """Runs the app on a SuperLink and two SuperNodes; returns (server
  workdir, the sites' state dirs, seconds of `flwr run`). extra: more run
  config.

  The workdir and state dirs are tmp_path's, the same on every call (a
  second call continues the run of the first). stop_after_round: once the
  server has checkpointed that round, stop the SuperLink (with the
  ServerApp), the SuperNodes and `flwr run`, as a killed deployment, and
  return without the run's end. log_dir: the processes' logs (tmp_path).
  """
  log_dir = str(log_dir or tmp_path)
  os.makedirs(log_dir, exist_ok=True)
  procs = _Processes(log_dir)
  cache = str(tmp_path / "xla_cache")
  link_port, *node_ports = runner.free_ports(3)
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
      node_config = (f'center="{center}" data-dir="{data_dir}" '
                     f'state-dir="{state}" cache-dir="{cache}"')
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
    args = [os.path.join(BIN, "flwr"), "run", ROOT, "local-test", "--stream",
            "--run-config", str(run_config)]
    start = time.perf_counter()
    if stop_after_round is not None:
      step = stop_after_round * settings.load_config(RUN_CONFIG).fed.local_steps
      cli = procs.start("flwr_run", args, env, cwd=ROOT)
      checkpoint = os.path.join(workdir, "checkpoints", str(step))
      while not os.path.isdir(checkpoint):  # orbax renames it when complete.
        assert cli.poll() is None and time.perf_counter() - start < 900, (
            f"no checkpoint {checkpoint}\n{procs.logs()}")
        time.sleep(0.2)
      return workdir, states, time.perf_counter() - start
    run = subprocess.run(args, env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    seconds = time.perf_counter() - start
    with open(os.path.join(log_dir, "flwr_run.log"), "w") as f:
      f.write(run.stdout + run.stderr)
    # `flwr run` can exit 0 on a failed run: the workdir says whether it ran.
    done = os.path.join(workdir, "flower_run.json")
    assert run.returncode == 0 and os.path.exists(done), (
        f"flwr run exit {run.returncode}\n{run.stdout[-4000:]}\n"
        f"{run.stderr[-4000:]}\n{procs.logs()}")
    return workdir, states, seconds
  finally:
    procs.stop()


def _in_job_reference(config, data_dir, tmp_path):
  """(clients, the in-job engine's run of `config`, seconds). Run first: its
  client program goes into the compilation cache the sites then read (the
  same program, so their first round loads it instead of compiling it
  twice at once)."""
  start = time.perf_counter()
  clients = train_data.make_clients(config, data_dir)
  with _compilation_cache(str(tmp_path / "xla_cache")):
    ref = federated.train(config, str(tmp_path / "in_job"), clients,
                          progress=False)
  return clients, ref, time.perf_counter() - start


def _assert_matches_in_job(workdir, states, config, ref):
  """The server's last checkpoint holds the in-job run's global params and
  EMA, and each site's AdamW state is its in-job client's (within 1e-5:
  FedAvg in Flower (numpy) and in the job (XLA) sum in float32); one state
  folder per site. Returns the checkpoint's (step, state, meta)."""
  checkpointer = loop.make_checkpointer(workdir, config.train)
  try:
    step, state, meta = checkpointer.restore_latest(
        {"params": ref["params"], "ema": ref["ema"]})
  finally:
    checkpointer.close()
  _leaves_close(state["params"], ref["params"], atol=1e-5)
  _leaves_close(state["ema"], ref["ema"], atol=1e-5)
  template = jax.eval_shape(lambda p: federated.init_opt_state(config, p),
                            ref["params"])
  for index, center in enumerate(("CBICA", "TCIA")):
    [site_dir] = glob.glob(os.path.join(states[center], "run-*", center))
    _leaves_close(client_app.load_opt_state(site_dir, config.fed.rounds, template),
                  federated.unstack(ref["opt_state"], index), atol=1e-5)
  return step, state, meta


@pytest.mark.slow  # about 75 s; .ci/run runs it after the default suite.
def test_two_supernodes_on_localhost_match_the_in_job_engine(
    preprocessed_2020, tmp_path):
  data_dir, manifest = preprocessed_2020
  config = settings.load_config(RUN_CONFIG)
  clients, ref, in_job_s = _in_job_reference(config, data_dir, tmp_path)
  workdir, states, flower_s = _flower_run(tmp_path, data_dir)
  record = json.load(open(os.path.join(workdir, "flower_run.json")))
  print(f"flwr run {flower_s:.1f}s, rounds {record['round_s']}; in-job "
        f"{in_job_s:.1f}s, compile {ref['compile_s']:.1f}s, rounds {ref['round_s']}")
  assert record["rounds"] == 2 and record["clients"] == ["CBICA", "TCIA"]

  # The server's last checkpoint: the global params and EMA after round 2;
  # each site kept its own AdamW state across the two processes of its rounds.
  step, state, meta = _assert_matches_in_job(workdir, states, config, ref)
  assert step == 4 and meta["round"] == 2 and meta["engine"] == "flower"
  counts = [manifest["splits"][f"{c}_train"]["num_slices"] for c in ("CBICA", "TCIA")]
  assert meta["num_examples"] == [c.num_examples for c in clients] == counts

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
  clients, ref, _ = _in_job_reference(config, data_dir, tmp_path)
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


@pytest.mark.slow  # two deployments: the stopped one about 60 s, the resumed 60 s.
def test_two_supernodes_resume_a_stopped_run(preprocessed_2020, tmp_path):
  data_dir, _ = preprocessed_2020
  config = settings.load_config(RUN_CONFIG)  # 2 rounds.
  _, ref, _ = _in_job_reference(config, data_dir, tmp_path)
  # The deployment is stopped (SuperLink with the ServerApp, SuperNodes,
  # `flwr run`) once the server has checkpointed round 1.
  workdir, states, stopped_s = _flower_run(tmp_path, data_dir,
                                           stop_after_round=1,
                                           log_dir=tmp_path / "stopped")
  checkpointer = loop.make_checkpointer(workdir, config.train)
  try:
    assert checkpointer.all_steps() == [2]
  finally:
    checkpointer.close()
  assert not os.path.exists(os.path.join(workdir, "flower_run.json"))
  with open(os.path.join(workdir, server_app.RUN_KEY_FILE)) as f:
    key = json.load(f)["run_key"]
  for center, state in states.items():
    assert [d for d in os.listdir(state) if d.startswith("run-")] == [f"run-{key}"]
    assert "opt_state_1.npz" in os.listdir(os.path.join(state, f"run-{key}", center))

  # A new SuperLink, new SuperNodes (same state dirs) and a new `flwr run`
  # (another Flower run id) with the same run config: only round 2 runs.
  workdir, states, resumed_s = _flower_run(tmp_path, data_dir,
                                           log_dir=tmp_path / "resumed")
  with open(os.path.join(workdir, "flower_run.json")) as f:
    record = json.load(f)
  print(f"stopped after round 1 in {stopped_s:.1f}s; resumed flwr run "
        f"{resumed_s:.1f}s, rounds {record['round_s']}")
  assert (record["rounds"], record["resumed_after"]) == (2, 1)
  assert len(record["round_s"]) == 1
  with open(tmp_path / "resumed" / "flwr_run.log") as f:
    stream = f.read()
  assert "after round 1 of 2" in stream
  # Flower's banner says the run's round (its own count is 1 of 1), and the
  # server's stream has each of its lines once (Flower's lines were also
  # printed by the root handler absl's first log call adds).
  assert "[ROUND 2/2]" in stream and "[ROUND 1/1]" not in stream
  assert stream.count("resuming ") == 1 and stream.count("[ROUND 2/2]") == 1
  # Each site logs its round in its SuperNode's log.
  for center in states:
    with open(tmp_path / "resumed" / f"supernode_{center}.log") as f:
      assert f"site {center} round 2 of 2: 2 local steps on " in f.read()
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4]
  # Both sites continued under the same run key: the final global params,
  # EMA and both AdamW states are the in-job engine's 2-round run's.
  for state in states.values():
    assert [d for d in os.listdir(state) if d.startswith("run-")] == [f"run-{key}"]
  step, state, meta = _assert_matches_in_job(workdir, states, config, ref)
  assert step == 4 and meta["round"] == 2
