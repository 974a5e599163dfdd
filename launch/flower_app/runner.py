"""Starting and following a Flower run from one command (launch.flower_run).

`flwr run` only submits the run (with --stream it also prints the log) and
exits 0 whatever the run's end. run_and_follow() submits it, streams its
log, polls its status (`flwr ls --run-id`) until it has finished, and says
how it ended: 0 only when Flower marks it completed and the server wrote
flower_run.json (when its workdir is on this machine); else 1 and one line,
the server's `error: ...` line when it logged one (logs.error), else
Flower's status (a stopped or failed run).

LocalDeployment brings up a SuperLink and one SuperNode per center on this
machine (Flower's deployment engine, no Ray), in a Flower home of their own
(never the user's ~/.flwr), and stops them and their app processes after:
a dry run of the federation before involving hospitals.

Not part of the Flower app (the SuperLink and SuperNodes never import it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from dfgm_jax import errors

# What every flwr process of ours gets (README, "train G1 federated with Flower").
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
COMPLETED = "finished:completed"
STOPPED = "finished:stopped"
DONE_FILE = "flower_run.json"  # server_app.DONE_FILE (not imported: no JAX here).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def bin_dir() -> str:
  """Where this Python's flwr, flower-superlink and flower-supernode are."""
  return os.path.dirname(sys.executable)


def flwr_env(flwr_home: str | None = None, base: dict | None = None) -> dict:
  """The environment of a flwr process: FLWR_ENV, this Python's bin first
  on PATH, and flwr_home as FLWR_HOME when given."""
  env = dict(os.environ if base is None else base, **FLWR_ENV)
  env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
  if flwr_home:
    env["FLWR_HOME"] = flwr_home
  return env


# --- How a run ended -------------------------------------------------------------


def error_line(line: str) -> str | None:
  """The message of a log line that carries one of the app's `error: ...`
  lines (after Flower's level prefix and colours), else None."""
  line = _ANSI.sub("", line).strip()
  at = line.find("error: ")
  return line[at + len("error: "):].strip() if at >= 0 else None


def verdict(run_id, status: str, details: str, errors_seen: list[str],
            done_file: str | None) -> tuple[int, str]:
  """(exit code, one line) for a finished run.

  status: Flower's ('finished:completed', 'finished:failed',
  'finished:stopped'); details: its status details; errors_seen: the
  `error: ...` messages of the run's log, in order; done_file: the server's
  flower_run.json when its workdir is on this machine, else None.
  """
  where = f"Flower run {run_id}"
  if status == COMPLETED:
    if errors_seen:
      return 1, f"{where} completed but logged an error: {errors_seen[-1]}"
    if done_file is not None and not os.path.exists(done_file):
      return 1, (f"{where} completed but wrote no {done_file}: the ServerApp "
                 "ended before its last round")
    return 0, f"{where} completed" + (f": {done_file}" if done_file else "")
  if status == STOPPED:
    return 1, f"{where} was stopped (flwr stop) before it finished"
  reason = errors_seen[-1] if errors_seen else (details or "no reason logged")
  return 1, f"{where} {status.split(':')[-1]}: {reason}"


# --- The flwr CLI -------------------------------------------------------------------


def _flwr(args, env, timeout=120) -> subprocess.CompletedProcess:
  return subprocess.run([os.path.join(bin_dir(), "flwr"), *args], env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _json_of(output: str) -> dict:
  """The JSON object flwr printed (--format json), {} without one."""
  start = output.find("{")
  try:
    return json.loads(output[start:]) if start >= 0 else {}
  except ValueError:
    return {}


def submit(app: str, superlink: str, run_config: list[str], env: dict) -> int:
  """`flwr run APP SUPERLINK -c ...`: the run id.

  Raises:
    errors.UserError: flwr refused the run (its own message).
  """
  args = ["run", app, superlink, "--format", "json"]
  for value in run_config:
    args += ["--run-config", value]
  done = _flwr(args, env)
  reply = _json_of(done.stdout)
  if done.returncode != 0 or not reply.get("success") or not reply.get("run-id"):
    why = reply.get("error-message") or (done.stderr or done.stdout).strip()
    raise errors.UserError("flwr run refused the run: " + " ".join(
        _ANSI.sub("", str(why)).split())[-800:])
  return int(reply["run-id"])


def status(run_id: int, superlink: str, env: dict) -> tuple[str, str] | None:
  """(status, details) of the run from `flwr ls`, None when unreachable."""
  done = _flwr(["ls", superlink, "--run-id", str(run_id), "--format", "json"],
               env, timeout=60)
  runs = _json_of(done.stdout).get("runs") or []
  if done.returncode != 0 or not runs:
    return None
  return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


@dataclasses.dataclass
class Followed:
  code: int
  message: str
  run_id: int | None = None


def follow(run_id: int, superlink: str, env: dict, *, done_file: str | None,
           poll_s: float = 3.0, lost_after_s: float = 60.0, out=None) -> Followed:
  """Streams the run's log (`flwr log --stream`) to `out` until Flower marks
  the run finished; then the verdict. A SuperLink unreachable for
  lost_after_s ends it with 1."""
  out = out or sys.stdout
  seen: list[str] = []
  stream = subprocess.Popen(
      [os.path.join(bin_dir(), "flwr"), "log", str(run_id), superlink,
       "--stream"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, start_new_session=True)

  def relay():
    for line in stream.stdout:
      out.write(line)
      out.flush()
      message = error_line(line)
      if message:
        seen.append(message)

  reader = threading.Thread(target=relay, daemon=True)
  reader.start()
  lost_since = None
  try:
    while True:
      state = status(run_id, superlink, env)
      if state is None:
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > lost_after_s:
          return Followed(1, f"Flower run {run_id}: the SuperLink {superlink} "
                          f"did not answer for {lost_after_s:.0f} s", run_id)
      else:
        lost_since = None
        if state[0].startswith("finished"):
          break
      time.sleep(poll_s)
    # The log's last lines (the server's error line) may trail the status.
    deadline = time.monotonic() + 10
    while stream.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    _end(stream)
    reader.join(timeout=5)
  code, message = verdict(run_id, state[0], state[1], seen, done_file)
  return Followed(code, message, run_id)


def _end(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
  """Ends a process started in its own session, and its process group."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
    try:
      proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(timeout=5)


def run_and_follow(app: str, superlink: str, run_config: list[str], env: dict, *,
                   done_file: str | None, out=None) -> Followed:
  """submit, then follow: the run's exit code and one line."""
  run_id = submit(app, superlink, run_config, env)
  print(f"Flower run {run_id} submitted to {superlink} (follow it with "
        f"`flwr log {run_id} {superlink}`, stop it with `flwr stop {run_id} "
        f"{superlink}`)", file=out or sys.stdout, flush=True)
  return follow(run_id, superlink, env, done_file=done_file, out=out)


# --- A deployment on this machine ---------------------------------------------------


def stop_process_trees(pids, grace_s: float = 15.0) -> None:
  """SIGTERM to each process and every process below it, SIGKILL to those
  still alive after grace_s; processes already gone are skipped."""
  import psutil  # pylint: disable=g-import-not-at-top
  tree = []
  for pid in pids:
    try:
      parent = psutil.Process(pid)
      tree += [parent] + parent.children(recursive=True)
    except psutil.NoSuchProcess:
      pass
  for p in tree:
    try:
      p.terminate()
    except psutil.NoSuchProcess:
      pass
  _, alive = psutil.wait_procs(tree, timeout=grace_s)
  for p in alive:
    try:
      p.kill()
    except psutil.NoSuchProcess:
      pass
  psutil.wait_procs(alive, timeout=5)


def free_ports(n: int) -> list[int]:
  """n distinct ports free now on 127.0.0.1."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def node_config(center: str, data_dir: str, state_dir: str,
                cache_dir: str | None = None) -> str:
  """A SuperNode's --node-config value (settings.NODE_KEYS)."""
  pairs = {"center": center, "data-dir": data_dir, "state-dir": state_dir}
  if cache_dir:
    pairs["cache-dir"] = cache_dir
  return " ".join(f"{k}={json.dumps(v)}" for k, v in pairs.items())


class LocalDeployment:
  """A SuperLink and one SuperNode per center on 127.0.0.1, in their own
  Flower home under `home` (with the flwr CLI's connection `local` in its
  config.toml); logs in home/<name>.log. A context manager: on exit every
  process it started, and the app processes they started, end."""

  CONNECTION = "local"

  def __init__(self, home: str, sites: dict, *, cache_dir: str | None = None,
               start_timeout_s: float = 60.0):
    """sites: {center: (data_dir, state_dir)}."""
    self.home = os.path.abspath(home)
    self.sites = sites
    self.cache_dir = cache_dir
    self.start_timeout_s = start_timeout_s
    self.procs: list[tuple[str, subprocess.Popen]] = []
    self.env = flwr_env(os.path.join(self.home, "flwr_cli"))

  def _start(self, name: str, args: list[str], flwr_home: str) -> subprocess.Popen:
    os.makedirs(flwr_home, exist_ok=True)
    log = open(os.path.join(self.home, f"{name}.log"), "w")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(args, env=flwr_env(flwr_home), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=self.home)
    log.close()  # the child holds it.
    self.procs.append((name, proc))
    return proc

  def __enter__(self):
    os.makedirs(self.home, exist_ok=True)
    link_port, *node_ports = free_ports(1 + len(self.sites))
    try:
      link = self._start("superlink", [
          os.path.join(bin_dir(), "flower-superlink"), "--insecure", "--host",
          "127.0.0.1", "--port", str(link_port),
          "--disable-runtime-dependency-installation"],
          os.path.join(self.home, "flwr_superlink"))
      self._wait_for_port(link_port, link, "superlink")
      for (center, (data_dir, state_dir)), port in zip(self.sites.items(),
                                                       node_ports):
        self._start(f"supernode_{center}", [
            os.path.join(bin_dir(), "flower-supernode"), "--insecure",
            "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
            "--node-config", node_config(center, os.path.abspath(data_dir),
                                         os.path.abspath(state_dir),
                                         self.cache_dir)],
            os.path.join(self.home, f"flwr_{center}"))
      cli_home = self.env["FLWR_HOME"]
      os.makedirs(cli_home, exist_ok=True)
      # Written whole each time (never appended): the connection of this
      # deployment only, in a Flower home of its own.
      with open(os.path.join(cli_home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "{self.CONNECTION}"\n\n'
                f'[superlink.{self.CONNECTION}]\n'
                f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    except BaseException:
      self.stop()
      raise
    print("local deployment: " + ", ".join(
        f"{name} pid {proc.pid}" for name, proc in self.procs)
          + f"; logs in {self.home}", flush=True)
    return self

  def _wait_for_port(self, port: int, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + self.start_timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          return
      time.sleep(0.2)
    raise errors.UserError(f"the local {name} did not start (see "
                           f"{os.path.join(self.home, name + '.log')})")

  def __exit__(self, *exc):
    self.stop()
    return False

  def stop(self, grace_s: float = 15.0) -> None:
    """SIGTERM to every started process and every process below it (the
    SuperLink's and SuperNodes' SuperExec and app processes, some in
    sessions of their own), then SIGKILL to what is left."""
    stop_process_trees([proc.pid for _, proc in self.procs], grace_s)
    for _, proc in self.procs:
      proc.wait(timeout=5)  # reaped.
    self.procs = []
