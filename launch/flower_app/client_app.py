"""The Flower ClientApp: one site's round of FedAvg on its own slices.

Every train message carries the global parameters and EMA (settings.py's
wire format) and the round (FedAvg's 'server-round', from 1). The site runs
federated.client_update, the in-job engine's client update: the same
program (federated.client_program), the same key fold_in(fold_in(root,
round), client) and the same batches (train_data.make_client, sampler seed
train.sampler_seed + client index), the client index being the site's
position in config.fed.centers. It replies with one ArrayRecord (its params
and EMA), one MetricRecord (its private count under settings.COUNT_KEY, by
which FedAvg weighs; the round's mean loss and grad_norm, which FedAvg
averages with the same weights) and one ConfigRecord naming the center and
round (FedAvg ignores it; the ServerApp checks that every center answered).

A SuperNode starts a new ClientApp process per message, so what a client
keeps across rounds lives on the site's disk: its AdamW state after round r
in state-dir/run-<run key>/<center>/opt_state_<r>.npz (the previous round's
file is kept too, so a message delivered twice, or a round the server asks
again after a restart, finds its input), and the compiled program in JAX's
persistent compilation cache (cache-dir). The run key comes in every train
message's ConfigRecord (settings.RUN_KEY, server_app.run_key), not Flower's
run id: a stopped run resumed by a new `flwr run` (another run id) asks
round r+1 of the same key, and the site continues from its own state after
round r (and, with DP, its seed and ledger). A key the site cannot use as
one folder name is refused.

DP-SGD (config.dp.enabled): the site's local steps are the in-job engine's
DP client update (federated.client_update on train_data.make_client's DP
sampler: Poisson sampling of the site's own patients at its own rate q,
per-patient clipping, Gaussian noise), with two differences a real
deployment needs:
- The randomness is the site's secret: config.seed is known to the server,
  which could otherwise regenerate the noise (and the sampled patients, so
  no amplification). The site's seed (node config dp-seed, else drawn once
  at its first round and kept in state-dir/run-<key>/<center>/dp_seed.json)
  replaces config.seed and train.sampler_seed at the site; keys and batches
  stay pure functions of (seed, round, step), so rounds differ.
- The site accounts what it released itself (dp_ledger.json beside the
  optimizer state: rounds released, steps, epsilon, and a digest of the
  global weights its last round trained from): each round answers once and
  in order (other weights with the same noise would leak it), except that
  the last released round is answered again for the same global weights
  (a server that restarted before its checkpoint asks it again): the same
  seed, optimizer state and weights give the same noise and the same
  answer, so epsilon does not grow;
  the whole run's fed.rounds x fed.local_steps steps must fit
  dp.target_epsilon at the site's q (checked every round, before any
  training), and its epsilon after the round goes back in the MetricRecord
  as dp_epsilon (the server logs each site's and their max; FedAvg's
  weighted mean of it is replaced by the max).
The site's unit slots are its own plan's (the in-job engine pads every
client to the largest, which changes no drawn unit, only truncation's rarer
tail; the same epsilon with the rdp accountant).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import secrets
import signal
import threading
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dfgm_jax import errors
from launch.flower_app import logs
from launch.flower_app import secure
from launch.flower_app import settings

# secure.secure_mod: SecAgg+'s messages through Flower's secaggplus_mod.
app = ClientApp(mods=[secure.secure_mod])


# --- The site's optimizer state between rounds ------------------------------------


def _state_dir(site: settings.Site, run_key) -> str:
  """state-dir/run-<run key>/<center>; the key is the server's, so it must
  be one plain folder name (letters, digits, '-', '_')."""
  run_key = str(run_key)
  if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_key):
    raise errors.UserError(
        f"site {site.center}: the server's run key {run_key[:80]!r} is not a "
        "plain name of at most 64 letters, digits, '-' or '_'")
  return os.path.join(site.state_dir, f"run-{run_key}", site.center)


def run_key(content) -> str:
  """The run key of a train message's ConfigRecord (settings.RUN_KEY)."""
  config = content.config_records.get("config")
  key = None if config is None else config.get(settings.RUN_KEY)
  if key in (None, ""):
    raise errors.UserError(
        "the server's train message has no run key (config "
        f"{settings.RUN_KEY!r}): the ServerApp must be this app's, at the "
        "same commit as the site")
  return str(key)


def _state_path(directory: str, rounds_done: int) -> str:
  return os.path.join(directory, f"opt_state_{rounds_done}.npz")


def save_opt_state(directory: str, rounds_done: int, opt_state) -> str:
  """Writes the optimizer state after `rounds_done` rounds (atomically);
  removes the files older than the previous round's."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dfgm_jax import stage_io  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  leaves = jax.device_get(jax.tree.leaves(opt_state))
  buffer = io.BytesIO()
  np.savez(buffer, **{f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
  path = _state_path(directory, rounds_done)
  stage_io.write_bytes(path, buffer.getvalue())
  for old in glob.glob(os.path.join(directory, "opt_state_*.npz")):
    done = re.search(r"opt_state_(\d+)\.npz$", old)
    if done and int(done.group(1)) < rounds_done - 1:
      os.remove(old)
  return path


def load_opt_state(directory: str, rounds_done: int, template):
  """The optimizer state saved after `rounds_done` rounds, in `template`'s
  structure (shapes and dtypes checked).

  Raises:
    errors.UserError: no such file (the site missed a round, or its
      state-dir changed within the run) or one that does not fit.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = _state_path(directory, rounds_done)
  if not os.path.exists(path):
    raise errors.UserError(
        f"{path}: no optimizer state of round {rounds_done}; this site must "
        "train every round of a run with the same state-dir")
  leaves, treedef = jax.tree.flatten(template)
  with np.load(path) as stored:
    names = sorted(stored.files)
    if len(names) != len(leaves):
      raise errors.UserError(f"{path}: {len(names)} arrays, the optimizer "
                             f"has {len(leaves)}")
    values = []
    for name, want in zip(names, leaves):
      value = stored[name]
      if value.shape != tuple(want.shape) or value.dtype != want.dtype:
        raise errors.UserError(f"{path}: array {name} is {value.dtype}"
                               f"{value.shape}, the optimizer's "
                               f"{want.dtype}{tuple(want.shape)}")
      values.append(value)
  return jax.tree.unflatten(treedef, values)


# --- DP-SGD at the site ---------------------------------------------------------

DP_SEED_FILE = "dp_seed.json"
DP_LEDGER_FILE = "dp_ledger.json"


def dp_seed(site: settings.Site, directory: str) -> int:
  """The site's secret seed: node config dp-seed, else the one it drew at
  its first round (kept in `directory`, readable by the site only)."""
  from dfgm_jax import stage_io  # pylint: disable=g-import-not-at-top
  if site.dp_seed is not None:
    return site.dp_seed
  path = os.path.join(directory, DP_SEED_FILE)
  stored = stage_io.read_json(path)
  if stored is not None:
    return int(stored["seed"])
  seed = secrets.randbits(31)
  os.makedirs(directory, exist_ok=True)
  # Owner-only from its first byte: written to a 0600 temporary, then renamed.
  tmp = f"{path}.tmp{os.getpid()}"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  with os.fdopen(fd, "w") as f:
    json.dump({"seed": seed}, f)
  os.replace(tmp, path)
  return seed


def site_config(config, seed: int):
  """A copy of the run's config whose seeds are the site's secret one (the
  client keys fold_in(fold_in(key(seed + 1), round), index) and the
  sampler's seed + index)."""
  config = config.copy_and_resolve_references()
  config.seed = int(seed)
  config.train.sampler_seed = int(seed)
  return config


def load_dp_ledger(directory: str) -> dict:
  """What the site released in this run: rounds, steps, epsilon."""
  from dfgm_jax import stage_io  # pylint: disable=g-import-not-at-top
  return stage_io.read_json(os.path.join(directory, DP_LEDGER_FILE)) or {
      "rounds": 0, "steps": 0, "epsilon": 0.0}


def arrays_digest(arrays) -> str | None:
  """sha256 of the global weights a round trains from (an ArrayRecord, or
  SecAgg+'s list in the same order): names left out, so both forms of the
  same weights agree. None for None."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if arrays is None:
    return None
  values = (arrays if isinstance(arrays, list)
            else [arrays[k].numpy() for k in arrays.keys()])
  digest = hashlib.sha256()
  for value in values:
    value = np.ascontiguousarray(value)
    digest.update(f"{value.dtype.str}{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def dp_check_round(config, center: str, accountant, ledger: dict,
                   round_index: int, ledger_path: str = DP_LEDGER_FILE,
                   input_digest: str | None = None) -> float:
  """The site's epsilon after this round; refuses the round before training.

  The round must be the one after the released ones, or the last released
  one again with the same global weights (input_digest equal to the
  ledger's): the same seed, state and weights give the same noise and the
  same answer, nothing new is released.

  Raises:
    errors.UserError: another round (a repeat with other weights would
      release them with the same noise; a skipped round has no state).
    errors.ConfigError: the run's steps (or this round's) exceed
      dp.target_epsilon at the site's sampling rate, naming the site.
  """
  from dfgm_jax.train import dp  # pylint: disable=g-import-not-at-top
  fed = config.fed
  tau = fed.local_steps
  released = int(ledger["rounds"])
  repeat = (round_index == released - 1 and input_digest is not None
            and input_digest == ledger.get("input_sha256"))
  if round_index != released and not repeat:
    raise errors.UserError(
        f"site {center}: asked for round {round_index + 1} but it released "
        f"{released} round(s) of this run ({ledger_path}); a DP site answers "
        "each round once and in order, repeating its last only for the same "
        "global weights (other weights with the same noise would leak it)")
  rounds = max(fed.rounds, round_index + 1)
  try:
    dp.check_budget(config, accountant, rounds * tau, multiple=tau,
                    steps_field=(f"config.fed.rounds={rounds} x "
                                 f"config.fed.local_steps={tau}"))
  except errors.ConfigError as e:
    raise errors.ConfigError(f"site {center} refuses round {round_index + 1}: "
                             f"{e}") from None
  return accountant.epsilon((round_index + 1) * tau)


# --- The round --------------------------------------------------------------------


def check_data_dir(site: settings.Site) -> None:
  """Refuses a data-dir that is no folder, or holds no private slices of the
  site's center (before the work of loading anything).

  Raises:
    errors.UserError: naming the node config's key and what is wrong.
  """
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(site.data_dir):
    raise errors.UserError(f"--node-config data-dir={site.data_dir}: no such "
                           "folder")
  split = f"{site.center}_train"
  splits = slice_sets.load_manifest(site.data_dir).get("splits", {})
  if not (splits.get(split) or {}).get("num_slices"):
    raise errors.UserError(
        f"--node-config data-dir={site.data_dir}: no private slices of center "
        f"{site.center} (its split {split} is missing or empty); preprocess "
        f"the site's volumes with {site.center} among config.data.centers")


def run_round(config, site: settings.Site, run_key, arrays,
              round_index: int) -> tuple:
  """One round at this site: (update, client index, seconds by phase,
  privacy: {} or dp_epsilon, dp_steps, dp_q, dp_units_total).

  Args:
    config: the run's config (settings.load_config).
    site: the site's node config.
    run_key: the run's key (the server's settings.RUN_KEY; keys the site's
      state, the same across the `flwr run`s of a resumed run).
    arrays: the global params and EMA (an ArrayRecord).
    round_index: the round, from 0.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dfgm_jax import stage_io  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import dp  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import federated  # pylint: disable=g-import-not-at-top
  from launch import train_data  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  centers = settings.centers(config)
  if site.center not in centers:
    raise errors.ConfigError(
        f"--node-config center={site.center!r}: not one of the run's "
        f"config.fed.centers={','.join(centers)}")
  index = centers.index(site.center)
  if config.train.reader != "synthetic":
    check_data_dir(site)
  directory = _state_dir(site, run_key)
  use_dp = diffusion.dp_enabled(config)
  if use_dp:
    config = site_config(config, dp_seed(site, directory))
  client = train_data.make_client(config, site.data_dir, site.center, index)
  privacy = {}
  if use_dp:
    ledger_path = os.path.join(directory, DP_LEDGER_FILE)
    ledger = load_dp_ledger(directory)
    accountant = dp.accountant_for(config, client.dp_sampling)
    input_digest = arrays_digest(arrays)
    epsilon = dp_check_round(config, site.center, accountant, ledger,
                             round_index, ledger_path, input_digest)
  graphdef, rest, params, _ = federated.init_global(config)
  if isinstance(arrays, list):  # SecAgg+'s legacy list, in the wire order.
    arrays = settings.list_to_record(arrays, params)
  params, ema = settings.from_record(arrays, params, "the server's arrays")
  if round_index == 0:
    opt_state = federated.init_opt_state(config, params)
  else:
    template = jax.eval_shape(lambda p: federated.init_opt_state(config, p),
                              params)
    opt_state = load_opt_state(directory, round_index, template)
  ready = time.perf_counter()
  update = federated.client_update(
      federated.client_program(graphdef, rest, config), config, params, ema,
      opt_state, client.batch_fn, round_index=round_index, client_index=index,
      num_examples=client.num_examples)
  jax.block_until_ready(update.params)
  trained = time.perf_counter()
  save_opt_state(directory, round_index + 1, update.opt_state)
  if use_dp:
    # Recorded before the reply leaves: the site counts what it released.
    steps = (round_index + 1) * config.fed.local_steps
    privacy = {"dp_epsilon": float(epsilon), "dp_steps": steps,
               "dp_q": client.dp_sampling.sampling_probability}
    stage_io.write_json(ledger_path, {
        "rounds": round_index + 1, "steps": steps, "epsilon": float(epsilon),
        "delta": config.dp.delta, "accountant": config.dp.accountant,
        "sampling": client.dp_sampling.to_dict(),
        "input_sha256": input_digest})
  return update, index, {"setup_s": ready - start, "train_s": trained - ready}, privacy


def _process_age() -> float | None:
  """Seconds since this process started (None where psutil is missing)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return time.time() - psutil.Process().create_time()
  except Exception:  # pylint: disable=broad-except  (a timing only)
    return None


# What of the client update's metrics a reply carries (FedAvg averages them
# with the count's weights; the server also logs each site's).
_METRICS = ("loss", "grad_norm", "dp_units", "dp_clipped_frac",
            "dp_unit_grad_norm")


def reply_content(site: settings.Site, index: int, round_index: int, update,
                  seconds: dict, privacy: dict):
  """The reply's RecordDict: the arrays, one MetricRecord (count, metrics,
  dp_epsilon), the site's ConfigRecord (center, round, seconds, DP steps)."""
  metrics = {settings.COUNT_KEY: update.num_examples,
             **{k: float(update.metrics[k]) for k in _METRICS
                if k in update.metrics}}
  if privacy:
    metrics[settings.EPSILON_KEY] = privacy["dp_epsilon"]
  return RecordDict({
      settings.ARRAYS_KEY: settings.to_record(update.params, update.ema),
      "metrics": MetricRecord(metrics),
      settings.SITE_KEY: ConfigRecord({
          "center": site.center, "client-index": index,
          "round": round_index + 1, **seconds,
          **{k: v for k, v in privacy.items() if k != "dp_epsilon"}}),
  })


# --- What a site's failure tells the server -------------------------------------


class SiteFailure(Exception):
  """A site's round failed; its text is what the server is told (what
  failed, not where: no local path or split name). The SuperNode's log keeps
  the full error with its traceback."""


# Absolute paths, and names of preprocessing splits (<center>_train, ...).
_PATH = re.compile(r"(?<![\w<>])/[^\s:'\",;()\[\]{}]+")
_SPLIT = re.compile(r"\b[\w.-]+_(?:train|val|test|healthy)\b")


def public_reason(site: settings.Site | None, center: str, error: BaseException) -> str:
  """The one line the server gets for a site's failure: 'site <center>:
  <what failed>', the site's folders and any other absolute path or split
  name of another center replaced by what they are (<data-dir>,
  <state-dir>, <cache-dir>, <path>, <split>)."""
  text = " ".join(str(error).split()) or type(error).__name__
  if site is not None:
    for name, path in (("<data-dir>", site.data_dir),
                       ("<state-dir>", site.state_dir),
                       ("<cache-dir>", site.cache_dir)):
      text = re.sub(re.escape(path.rstrip("/")) + r"(/[^\s:'\",;]*)?", name, text)
  # The site's own center's splits name nothing the server does not know.
  text = _SPLIT.sub(lambda m: m.group(0) if m.group(0).startswith(f"{center}_")
                    else "<split>", _PATH.sub("<path>", text))
  if not isinstance(error, errors.UserError):  # a bug, not the site's input.
    text = f"{type(error).__name__}: {text}"
  return f"site {center}: {text} (details in the site's SuperNode log)"


def _center(node_config) -> str:
  """The node config's center for a message, '?' without one."""
  return str(node_config.get("center", "") or "?")


# --- Stop means stop ------------------------------------------------------------


@contextlib.contextmanager
def exit_on_stop(center: str, exit_fn=os._exit):  # pylint: disable=protected-access
  """Within it, a SIGINT or SIGTERM ends this process at once.

  Flower tells a ClientApp process that its run was stopped (`flwr stop`),
  or that its SuperNode is gone, by raising SIGINT in it; Python runs the
  handler only when the main thread is back in the interpreter, which a
  round's compiled training is not for tens of seconds. The signal's
  wake-up byte (signal.set_wakeup_fd) is written at once: a thread reading
  it ends the process (exit status 128 + the signal), so the round's
  training stops with its run. Nothing is lost: the site writes its state
  only after training, and the server never got this round's reply.
  """
  if threading.current_thread() is not threading.main_thread():
    yield  # set_wakeup_fd works in the main thread only.
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

  def watch():
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:  # the write end closed: the round is over.
        return
      for number in (signal.SIGINT, signal.SIGTERM):
        if number in data:
          logs.say("site %s: stopped (%s), this round ends here", center,
                   signal.Signals(number).name)
          exit_fn(128 + number)
          return

  watcher = threading.Thread(target=watch, daemon=True, name="exit_on_stop")
  watcher.start()
  try:
    yield
  finally:
    signal.set_wakeup_fd(previous)
    os.close(write_fd)
    watcher.join(timeout=5)
    os.close(read_fd)


@app.query()
def query(msg: Message, context: Context) -> Message:
  """Which center this SuperNode is (the server names the sites that never
  came by the centers of those that did)."""
  return Message(content=RecordDict({settings.SITE_KEY: ConfigRecord({
      "center": _center(context.node_config)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
  """FedAvg's train message -> this site's params, EMA and private count.

  A failure is logged here in full and reaches the server as SiteFailure
  (public_reason)."""
  site = None
  try:
    site = settings.site(context.node_config)
    with exit_on_stop(site.center):
      return _train(msg, context, site)
  except Exception as e:  # pylint: disable=broad-except  (told, then raised)
    logs.error(f"site {_center(context.node_config)}: {e}")
    raise SiteFailure(public_reason(site, _center(context.node_config), e)) from e


def _train(msg: Message, context: Context, site: settings.Site) -> Message:
  started = _process_age()  # the process's start and imports, before this.
  settings.use_compilation_cache(site.cache_dir)
  config = settings.load_config(context.run_config)
  legacy = secure.is_legacy_fit(msg.content)  # SecAgg+'s FitIns.
  if legacy:
    arrays, round_index, key = secure.legacy_fit(msg.content)
    if key in (None, ""):
      raise errors.UserError("the server's FitIns has no run key: the "
                             "ServerApp must be this app's, at the same commit")
  else:
    arrays = msg.content[settings.ARRAYS_KEY]
    round_index = int(msg.content["config"]["server-round"]) - 1
    key = run_key(msg.content)
  update, index, seconds, privacy = run_round(
      config, site, key, arrays, round_index)
  logs.say(round_line(site.center, round_index, config.fed.rounds,
                      config.fed.local_steps, update.num_examples,
                      update.metrics["loss"], seconds, privacy))
  if started is not None:
    seconds["start_s"] = started
  content = reply_content(site, index, round_index, update, seconds, privacy)
  if legacy:
    [metrics] = content.metric_records.values()
    content = secure.legacy_reply(content[settings.ARRAYS_KEY],
                                  update.num_examples, dict(metrics),
                                  dict(content[settings.SITE_KEY]))
  return Message(content=content, reply_to=msg)


def round_line(center: str, round_index: int, rounds: int, local_steps: int,
               num_examples: int, loss: float, seconds: dict,
               privacy: dict) -> str:
  """The site's line of a round in its SuperNode's log: loss, local steps,
  seconds, and with DP its epsilon."""
  return (f"site {center} round {round_index + 1} of "
          f"{max(rounds, round_index + 1)}: {local_steps} local steps on "
          f"{num_examples} private slices, loss {float(loss):.4f}, setup "
          f"{seconds['setup_s']:.1f}s, train {seconds['train_s']:.1f}s"
          + (f", DP epsilon {privacy['dp_epsilon']:.3f}" if privacy else ""))
