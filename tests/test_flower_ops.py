"""Operating the Flower app: a bounded wait for the sites that names the
missing ones, a site's failure told to the server without its paths, the
sites' round lines, each log line once, the run's own round numbers, a
ClientApp that stops when told, the typed run config and kebab-case node
config, and launch.flower_run's verdict on how a run ended. Fast: no
SuperLink (tests/test_flower.py runs them on localhost)."""

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity
import numpy as np

from dfgm_jax import errors
from launch.flower_app import client_app
from launch.flower_app import logs
from launch.flower_app import runner
from launch.flower_app import server_app
from launch.flower_app import settings
from tests.conftest import ROOT

TINY = {"config": "configs/tiny.py",
        "overrides": ("train.reader=grain fed.rounds=2 fed.local_steps=2 "
                      "fed.centers=CBICA,TCIA")}


# --- The wait for the sites -----------------------------------------------------


class _Clock:
  """A clock that sleep() advances."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds


class _Grid:
  def __init__(self, connected):
    self.connected = connected  # [(time from which, node id)]
    self.clock = None

  def get_node_ids(self):
    now = self.clock() if self.clock else 0.0
    return [n for t, n in self.connected if t <= now]


def test_the_server_waits_a_bounded_time_then_names_the_sites_that_never_came():
  clock = _Clock()
  grid = _Grid([(0.0, 11), (20.0, 12)])
  grid.clock = clock
  # Both come within the wait: their nodes, once the second is there.
  assert server_app.wait_for_sites(grid, ["CBICA", "TCIA"], 30.0,
                                   clock=clock, sleep=clock.sleep) == [11, 12]
  assert clock.now == pytest.approx(20.0)
  # One never comes: after the wait (not forever), its center is named.
  clock.now = 0.0
  grid.connected = [(0.0, 11)]
  asked = []
  with pytest.raises(errors.UserError) as e:
    server_app.wait_for_sites(
        grid, ["CBICA", "TCIA"], 30.0, clock=clock, sleep=clock.sleep,
        ask=lambda nodes: asked.append(nodes) or ["CBICA"])
  assert asked == [[11]] and clock.now == pytest.approx(30.0)
  assert "the sites never came: TCIA (1 of 2 connected after the run config's " \
         "site-wait=30 s)" in str(e.value)
  # A site that cannot say who it is: the count and the run's centers.
  clock.now = 0.0
  with pytest.raises(errors.UserError, match=r"never came: 1 of CBICA, TCIA"):
    server_app.wait_for_sites(grid, ["CBICA", "TCIA"], 5.0, clock=clock,
                              sleep=clock.sleep, ask=lambda nodes: [])


def test_each_round_waits_for_the_sites_and_asks_the_connected_their_center(
    monkeypatch):
  for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
    monkeypatch.setattr(TaskIdentity, name, value)

  class Grid:
    sent = []

    def get_node_ids(self):
      return [11]

    def send_and_receive(self, messages, timeout):
      self.sent += list(messages)
      return [Message(RecordDict({settings.SITE_KEY: ConfigRecord(
          {"center": "CBICA"})}), reply_to=m) for m in self.sent]

  grid = Grid()
  strategy = server_app.SiteFedAvg(
      centers=["CBICA", "TCIA"], on_round=None, site_wait_s=0.0,
      min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0)
  with pytest.raises(errors.UserError, match="the sites never came: TCIA"):
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
  [query] = grid.sent
  assert query.metadata.message_type == "query"
  # The ClientApp's answer: its node config's center, nothing else.
  reply = client_app.query(query, Context(run_id=7, node_id=11, node_config={
      "center": "TCIA", "data-dir": "/private/x"}, state=RecordDict(),
                                          run_config={}))
  assert dict(reply.content[settings.SITE_KEY]) == {"center": "TCIA"}


# --- A site's failure, as the server gets it ------------------------------------


def _train_message(round_number=1):
  return Message(RecordDict({
      settings.ARRAYS_KEY: ArrayRecord({"params/w": Array(np.zeros(2, np.float32))}),
      "config": ConfigRecord({"server-round": round_number,
                              settings.RUN_KEY: "0123abcd"})}),
                 dst_node_id=11, message_type="train")


def test_a_sites_failure_reaches_the_server_as_what_failed_not_where(
    tmp_path, monkeypatch):
  for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
    monkeypatch.setattr(TaskIdentity, name, value)
  monkeypatch.setattr(settings, "use_compilation_cache", lambda d: None)
  private = str(tmp_path / "hospital" / "slices")
  context = Context(run_id=7, node_id=11, node_config={
      "center": "TCIA", "data-dir": private, "state-dir": str(tmp_path / "s")},
                    state=RecordDict(), run_config=TINY)
  with pytest.raises(client_app.SiteFailure) as e:
    client_app.train(_train_message(), context)
  text = str(e.value)
  assert text == ("site TCIA: --node-config data-dir=<data-dir>: no such folder "
                  "(details in the site's SuperNode log)")
  assert private in str(e.value.__cause__)  # the site's own log has it.
  # Other paths and split names are left out too; a bug says its type.
  site = settings.site(context.node_config)
  assert client_app.public_reason(site, "TCIA", errors.UserError(
      f"{private}/TCIA_train/slices.npz: unreadable, see /etc/x.conf")) == (
          "site TCIA: <data-dir>: unreadable, see <path> (details in the "
          "site's SuperNode log)")
  assert client_app.public_reason(None, "TCIA", KeyError("CBICA_train")) == (
      "site TCIA: KeyError: '<split>' (details in the site's SuperNode log)")
  # A center with no data at its site: said before loading anything.
  os.makedirs(private)
  with open(os.path.join(private, "manifest.json"), "w") as f:
    f.write('{"splits": {"CBICA_train": {"num_slices": 3}, "healthy": {}}}')
  with pytest.raises(errors.UserError) as no_data:
    client_app.check_data_dir(site)
  assert client_app.public_reason(site, "TCIA", no_data.value) == (
      "site TCIA: --node-config data-dir=<data-dir>: no private slices of "
      "center TCIA (its split TCIA_train is missing or empty); preprocess the "
      "site's volumes with TCIA among config.data.centers (details in the "
      "site's SuperNode log)")
  # The server's error: Flower's wrapping of the exception removed.
  reply = Message(Error(code=2, reason=f"<class '{type(e.value).__module__}."
                        f"SiteFailure'>:<'{text}'>"), reply_to=_train_message())
  strategy = server_app.SiteFedAvg(
      centers=["CBICA", "TCIA"], on_round=None, min_train_nodes=2,
      min_available_nodes=2, fraction_evaluate=0.0)
  with pytest.raises(errors.UserError) as failed:
    strategy.aggregate_train(1, [reply])
  assert str(failed.value) == f"round 1: 1 site(s) failed: {text}"


# --- Log lines: the site's rounds, each line once, the run's round numbers ------


def test_a_site_logs_its_round_where_its_operator_looks(caplog):
  line = client_app.round_line("TCIA", 1, 2, 50, 30, 0.123456,
                               {"setup_s": 1.25, "train_s": 20.5},
                               {"dp_epsilon": 1.5})
  assert line == ("site TCIA round 2 of 2: 50 local steps on 30 private slices, "
                  "loss 0.1235, setup 1.2s, train 20.5s, DP epsilon 1.500")
  # Through Flower's logger, which a SuperNode's log shows (absl's INFO
  # lines are dropped in an app process, its flags never parsed).
  flwr_logger = logging.getLogger(logs.FLOWER_LOGGER)
  flwr_logger.addHandler(caplog.handler)
  try:
    logs.say(line)
  finally:
    flwr_logger.removeHandler(caplog.handler)
  assert [r.getMessage() for r in caplog.records] == [line]


def test_each_line_of_the_server_stream_is_printed_once():
  # An app process: importing the app, then absl's first log call (orbax's,
  # JAX's) adds a root handler; Flower's lines must not be printed twice.
  code = textwrap.dedent("""
      from launch.flower_app import server_app
      from absl import logging
      logging.warning("a library's warning")
      server_app.logs.say("the server's line")
      """)
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                        capture_output=True, timeout=120,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert done.returncode == 0, done.stderr
  output = done.stdout + done.stderr
  assert output.count("the server's line") == 1, output
  assert output.count("a library's warning") == 1, output


def test_flowers_round_banner_says_the_runs_round_after_a_resume(caplog):
  from flwr.common import log
  flwr_logger = logging.getLogger(logs.FLOWER_LOGGER)
  flwr_logger.addHandler(caplog.handler)
  try:
    with logs.run_rounds(1, 2):  # resumed after round 1 of 2.
      log(logging.INFO, "[ROUND %s/%s]", 1, 1)  # Flower's FedAvg.start
      log(logging.INFO, "[ROUND %s]", 1)  # the legacy (SecAgg+) workflow
    log(logging.INFO, "[ROUND %s/%s]", 1, 1)  # another run, not resumed
  finally:
    flwr_logger.removeHandler(caplog.handler)
  assert [r.getMessage() for r in caplog.records] == [
      "[ROUND 2/2]", "[ROUND 2/2]", "[ROUND 1/1]"]


# --- Stop means stop --------------------------------------------------------------


def test_a_sigint_ends_the_client_process_while_its_main_thread_is_busy():
  # Flower raises SIGINT in a ClientApp process whose run was stopped; a
  # Python handler would only run after the round's compiled training. Here
  # the main thread never acts on it (its handler does nothing).
  code = textwrap.dedent("""
      import os, signal, threading, time
      from launch.flower_app import client_app
      signal.signal(signal.SIGINT, lambda *a: None)
      with client_app.exit_on_stop("TCIA"):
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        end = time.monotonic() + 60
        while time.monotonic() < end:
          time.sleep(0.05)
      print("trained on")
      """)
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                        capture_output=True, timeout=120,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert done.returncode == 128 + signal.SIGINT, done.stdout + done.stderr
  assert "trained on" not in done.stdout
  assert "site TCIA: stopped (SIGINT)" in done.stdout + done.stderr


# --- Run config and node config ---------------------------------------------------


def test_the_typed_run_config_keys_and_one_naming_style():
  config = settings.load_config({"config": "configs/tiny.py", "rounds": 3,
                                 "local-steps": 5, "centers": "CBICA,TCIA",
                                 "overrides": "train.batch_size=4"})
  assert (config.fed.rounds, config.fed.local_steps, config.fed.centers,
          config.train.batch_size) == (3, 5, "CBICA,TCIA", 4)
  # 0 and "": the config file's values.
  default = settings.load_config({"config": "configs/tiny.py", "rounds": 0,
                                  "centers": "A,B"})
  assert default.fed.rounds == settings.load_config(
      {"config": "configs/tiny.py", "overrides": "fed.centers=A,B"}).fed.rounds
  with pytest.raises(errors.ConfigError, match=r"run config rounds=3 and "
                     r"overrides fed.rounds=\.\.\.: set fed.rounds once"):
    settings.load_config({"config": "configs/tiny.py", "rounds": 3,
                          "overrides": "fed.rounds=2 fed.centers=A,B"})
  with pytest.raises(errors.ConfigError, match="local-steps='5'"):
    settings.load_config({"config": "configs/tiny.py", "local-steps": "5",
                          "centers": "A,B"})
  # The node config: kebab-case as the run config; old names refused by name.
  site = settings.site({"center": "A", "data-dir": "/d", "state-dir": "/s",
                        "dp-seed": "3"})
  assert (site.data_dir, site.cache_dir, site.dp_seed) == ("/d", "/s/xla_cache", 3)
  with pytest.raises(errors.ConfigError,
                     match="--node-config data_dir: renamed data-dir"):
    settings.site({"center": "A", "data_dir": "/d", "state-dir": "/s"})


# --- launch.flower_run: how a run ended -------------------------------------------


def test_flower_run_exits_zero_only_for_a_completed_run_that_wrote_its_record(
    tmp_path):
  done = str(tmp_path / "flower_run.json")
  assert runner.verdict(3, "finished:completed", "", [], done)[0] == 1
  open(done, "w").close()
  assert runner.verdict(3, "finished:completed", "", [], done) == (
      0, f"Flower run 3 completed: {done}")
  assert runner.verdict(3, "finished:completed", "", [], None)[0] == 0
  assert runner.verdict(3, "finished:completed", "", ["x"], done) == (
      1, "Flower run 3 completed but logged an error: x")
  assert runner.verdict(3, "finished:stopped", "", [], done) == (
      1, "Flower run 3 was stopped (flwr stop) before it finished")
  # A failed run: the server's error line, else Flower's details.
  line = "\x1b[91mERROR \x1b[0m:      error: round 1: 1 site(s) failed: site TCIA: x"
  reason = runner.error_line(line)
  assert reason == "round 1: 1 site(s) failed: site TCIA: x"
  assert runner.error_line("INFO :      [ROUND 1/2]") is None
  assert runner.verdict(3, "finished:failed", "ServerApp raised", [reason],
                        done) == (1, f"Flower run 3 failed: {reason}")
  assert runner.verdict(3, "finished:failed", "ServerApp raised", [], done) == (
      1, "Flower run 3 failed: ServerApp raised")
  # The local deployment's SuperNodes: kebab-case node config.
  assert runner.node_config("TCIA", "/d", "/s") == (
      'center="TCIA" data-dir="/d" state-dir="/s"')


# --- On localhost: launch.flower_run over a SuperLink and SuperNodes -------------

# The tiny config, one round of two local steps, reading the phantom slices.
LOCAL_RUN_CONFIG = (
    "config='configs/tiny.py' rounds={rounds} local-steps=2 centers='{centers}' "
    "site-wait={wait} overrides='train.reader=grain train.batch_size=4 "
    "train.tensorboard=False model.overrides.attention_resolutions=() "
    "fed.engine=sequential'")


def _flower_run_args(tmp_path, sites, data_dirs, *, centers=None, rounds=1,
                     wait=60):
  return [sys.executable, "-m", "launch.flower_run",
          f"--local_sites={','.join(sites)}",
          *[f"--data_dir={d}" for d in data_dirs],
          f"--state_dir={tmp_path / 'fl'}", f"--workdir={tmp_path / 'server'}",
          "--run_config=" + LOCAL_RUN_CONFIG.format(
              rounds=rounds, centers=centers or ",".join(sites), wait=wait)]


def _env():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("PYTHONPATH", None)  # the apps run from the FAB the SuperLink sent.
  return env


def _flower_run(tmp_path, *args, **kwargs):
  done = subprocess.run(_flower_run_args(tmp_path, *args, **kwargs), cwd=ROOT,
                        env=_env(), text=True, capture_output=True, timeout=600)
  return done.returncode, done.stdout, done.stderr.strip().splitlines()


@pytest.mark.slow  # about 70 s: a deployment whose round 1 fails at both sites.
@pytest.mark.ci_slow
def test_flower_run_fails_loudly_for_a_wrong_data_dir_and_a_center_without_data(
    preprocessed_2020, tmp_path):
  data_dir, _ = preprocessed_2020
  wrong = str(tmp_path / "no_such_slices")
  code, stream, stderr = _flower_run(
      tmp_path, ["CBICA", "TCGA"], [f"CBICA={wrong}", f"TCGA={data_dir}"])
  assert code == 1, stream
  # One line: what failed at each site, not where.
  assert stderr[-1].startswith("error: Flower run ") and " failed: round 1: 2 " \
      "site(s) failed: " in stderr[-1], stderr
  assert ("site CBICA: --node-config data-dir=<data-dir>: no such folder"
          in stderr[-1])
  assert "site TCGA: --node-config data-dir=<data-dir>: no private slices of " \
         "center TCGA" in stderr[-1]
  for text in (stream, stderr[-1]):  # the server's stream has no site path.
    assert wrong not in text and data_dir not in text
    assert "CBICA_train" not in text
  # Each site's own log has the full error, with its path.
  with open(tmp_path / "fl" / "supernode_CBICA.log") as f:
    assert f"data-dir={wrong}: no such folder" in f.read()
  assert not os.path.exists(tmp_path / "server" / "flower_run.json")


@pytest.mark.slow  # about 50 s: a deployment with one of two sites.
@pytest.mark.ci_slow
def test_flower_run_names_a_missing_site_after_the_bounded_wait(
    preprocessed_2020, tmp_path):
  data_dir, _ = preprocessed_2020
  start = time.monotonic()
  code, stream, stderr = _flower_run(tmp_path, ["CBICA"], [data_dir],
                                     centers="CBICA,TCIA", wait=5)
  assert code == 1, stream
  assert "the sites never came: TCIA (1 of 2 connected after the run " \
         "config's site-wait=5 s)" in stderr[-1], stderr
  assert stream.count("waiting for the sites: 1 of 2 connected") == 1
  print(f"missing site: flower_run exited after {time.monotonic() - start:.1f}s")


@pytest.mark.slow  # about 70 s: a deployment stopped in its first round.
@pytest.mark.ci_slow
def test_a_stopped_run_fails_and_its_sites_clientapps_end_with_their_supernodes(
    preprocessed_2020, tmp_path):
  import psutil  # pylint: disable=g-import-not-at-top
  data_dir, _ = preprocessed_2020
  out = open(tmp_path / "flower_run.out", "w+")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      _flower_run_args(tmp_path, ["CBICA", "TCIA"], [data_dir], rounds=2),
      cwd=ROOT, env=_env(), text=True, stdout=out, stderr=subprocess.STDOUT)

  def below(name):
    found = []
    try:
      for p in psutil.Process(proc.pid).children(recursive=True):
        try:
          if (p.status() != psutil.STATUS_ZOMBIE
              and name in " ".join(p.cmdline())):
            found.append(p)
        except psutil.Error:
          pass
    except psutil.Error:
      pass
    return found

  try:
    deadline = time.monotonic() + 300
    while len(below("flwr-clientapp")) < 2:  # both sites are in round 1.
      assert proc.poll() is None and time.monotonic() < deadline, (
          open(tmp_path / "flower_run.out").read())
      time.sleep(0.5)
    time.sleep(5)  # into their imports, data and compile.
    with open(tmp_path / "flower_run.out") as f:
      run_id = re.search(r"Flower run (\d+) submitted", f.read()).group(1)
    env = runner.flwr_env(str(tmp_path / "fl" / "flwr_cli"))
    stop = subprocess.run([os.path.join(runner.bin_dir(), "flwr"), "stop",
                           run_id, "local"], env=env, text=True,
                          capture_output=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    # The sites stop their SuperNodes: the ClientApps of the stopped round
    # end with them (mid-training), not orphaned.
    for node in below("flower-supernode"):
      node.terminate()
    stopped = time.monotonic()
    while below("flwr-clientapp") and time.monotonic() - stopped < 20:
      time.sleep(0.5)
    left = below("flwr-clientapp")
    assert not left, f"ClientApps left after their SuperNodes stopped: {left}"
    print(f"ClientApps ended {time.monotonic() - stopped:.1f}s after their "
          "SuperNodes")
    assert proc.wait(timeout=120) == 1
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out.seek(0)
  lines = out.read().strip().splitlines()
  assert lines[-1] == (f"error: Flower run {run_id} was stopped (flwr stop) "
                       "before it finished")
  assert not os.path.exists(tmp_path / "server" / "flower_run.json")


def test_flower_run_refuses_a_data_dir_for_a_site_it_does_not_run(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "launch.flower_run", "--local_sites=CBICA,TCIA",
       f"--state_dir={tmp_path / 'fl'}", f"--workdir={tmp_path / 'server'}",
       "--data_dir=/slices", "--data_dir=TCGA=/other"], cwd=ROOT, text=True,
      capture_output=True, timeout=120, env=_env())
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      "error: --data_dir=TCGA=/other: TCGA is not one of "
      "--local_sites=CBICA,TCIA"]
  assert not os.path.exists(tmp_path / "fl")  # refused before starting anything.
