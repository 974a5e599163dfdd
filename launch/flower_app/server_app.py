"""The Flower ServerApp: FedAvg of G1 over the sites, weighted by private counts.

The global parameters and EMA start as the in-job engine's
(federated.init_global: the config's seed) and travel as one ArrayRecord
(settings.py). Flower's FedAvg averages every array of the sites' replies
with weights n_k / sum n, n_k the site's private slice count (its
MetricRecord's settings.COUNT_KEY): parameters and EMA alike, as
federated.aggregate does. config.fed.rounds rounds, every site every round
(min_train_nodes = min_available_nodes = K = len(config.fed.centers)); no
federated evaluation. Before each round (with SecAgg+, before the first)
the server waits at most the run config's site-wait seconds for all K
sites to be connected (Flower's own wait has no limit), then stops naming
the centers that never came (wait_for_sites; the connected SuperNodes say
theirs). A site's failure arrives as its SiteFailure text (what failed, not
where: client_app.public_reason) and stops the run with it; a user error
ends the ServerApp after one `error: ...` line (launch.flower_run reports
it). Flower's round banners carry the run's rounds ('[ROUND 2/2]' for a
resumed run's round 2), not its count of this `flwr run`'s.

The server's workdir (run config `workdir`) gets what the in-job engine
writes: a checkpoint per round (checkpoints/<rounds x tau>: `state`
{params, ema}, `meta` {config, round, clients, num_examples}), so
launch.export_model --model_dir=WORKDIR exports the global EMA and
Denoiser.load reads it; metrics.jsonl (a row per round: the sites' mean and
per-center loss, grad_norm, num_examples, round_time_s); run.json (the
run's identity); flower_run_key.json (the run key, below); and
flower_run.json when all rounds are done. A round that misses a site, or
hears one center twice, stops the run (the sites' optimizer states and the
weights assume all K every round); so does a site that fails, e.g. a DP
site whose budget the run would exceed (its refusal is the error the
server raises; the rounds before it keep their checkpoints).

Resume: a new `flwr run` with the same config and workdir (a killed
ServerApp, a restarted SuperLink, a site that crashed mid-round) continues
the run. The workdir is claimed with federated.run_identity (another config
is refused; fed.rounds may change, so a finished run can also be
extended); the newest checkpoint's round r and global params/EMA are the
start, and rounds r+1 .. fed.rounds run with Flower's rounds renumbered
(SiteFedAvg.first_round: the sites get 'server-round' r+1, ...). A run
whose checkpoints already hold fed.rounds rounds is a no-op that says so
(no site is contacted). Only the Flower engine's own checkpoints resume
(the in-job engine's hold optimizer states the sites lack). The sites'
state (AdamW, with DP the secret seed and the ledger) is keyed not by
Flower's run id, which every `flwr run` changes, but by the run key that
every round's ConfigRecord carries (settings.RUN_KEY): sha256 of the run
identity and a nonce drawn when the workdir is first claimed (or
overwritten), kept in flower_run_key.json; so two runs of one config in two
workdirs never share site state, and a resumed run finds its own.

DP-SGD (config.dp.enabled) runs at the sites (client_app.py): each reports
its own epsilon (its MetricRecord's settings.EPSILON_KEY); the metrics row
has '<center>/dp_epsilon' (and the site's q and steps) per site and
dp_epsilon = their max, as the in-job engine's; the aggregate MetricRecord
FedAvg returns gets the max in place of its weighted mean.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import time

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from dfgm_jax import errors
from launch.flower_app import logs
from launch.flower_app import secure
from launch.flower_app import settings

app = ServerApp()

RUN_KEY_FILE = "flower_run_key.json"
DONE_FILE = "flower_run.json"
SITE_WAIT_S = 600.0  # the run config's site-wait default (pyproject.toml's).


# --- The sites: waiting for them, naming the missing, their failures -------------


def wait_for_sites(grid, centers, wait_s: float, *, ask=None, poll_s: float = 1.0,
                   clock=time.monotonic, sleep=time.sleep) -> list:
  """The connected node ids once all len(centers) sites are; waits at most
  wait_s seconds (Flower's own wait for min_available_nodes has no limit).

  ask(node_ids) -> the centers of those nodes (ask_centers), used only when
  some never came, to name them; None names none.

  Raises:
    errors.UserError: the sites not connected after wait_s, by center.
  """
  deadline = clock() + wait_s
  said = -1
  while True:
    nodes = list(grid.get_node_ids())
    if len(nodes) >= len(centers):
      return nodes
    if clock() >= deadline:
      break
    if len(nodes) != said:
      logs.say("waiting for the sites: %d of %d connected (at most %.0f s, run "
               "config site-wait)", len(nodes), len(centers), wait_s)
      said = len(nodes)
    sleep(poll_s)
  came = []
  if ask is not None and nodes:
    try:
      came = list(ask(nodes))
    except Exception as e:  # pylint: disable=broad-except  (naming is best effort)
      logs.say("could not ask the connected sites their centers: %s", e)
  missing = [c for c in centers if c not in came]
  named = (", ".join(missing) if len(missing) == len(centers) - len(nodes)
           else f"{len(centers) - len(nodes)} of {', '.join(missing)}")
  raise errors.UserError(
      f"the sites never came: {named} ({len(nodes)} of {len(centers)} "
      f"connected after the run config's site-wait={wait_s:g} s); start their "
      "SuperNodes (--node-config center=...) or raise site-wait")


def ask_centers(grid, node_ids, timeout: float = 120.0) -> list[str]:
  """The centers of the given nodes (a query message each; the ClientApp's
  query answers its node config's center)."""
  from flwr.app import Message, MessageType, RecordDict  # pylint: disable=g-import-not-at-top
  messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
              for n in node_ids]
  return [str(r.content[settings.SITE_KEY]["center"])
          for r in grid.send_and_receive(messages, timeout=timeout)
          if not r.has_error()]


# Flower's text of a ClientApp's exception: "<class '...'>:<'message'>".
_FLOWER_REASON = re.compile(r"^<class '[\w.]+'>:<'(.*)'>$", re.S)


def site_reason(reason: str) -> str:
  """The message of a site's failure, from Flower's reason text (the
  ClientApp's SiteFailure: what failed, not where), on one line."""
  match = _FLOWER_REASON.match(reason.strip())
  return " ".join((match.group(1) if match else reason).split())[:1500]


class SiteFedAvg(FedAvg):
  """Flower's FedAvg (weighted by settings.COUNT_KEY) that checks every
  center answered each round and records the round: a checkpoint, a
  metrics row."""

  def __init__(self, *, centers, on_round, first_round: int = 1,
               site_wait_s: float = SITE_WAIT_S, **kwargs):
    """first_round: the run's round that Flower's round 1 is (a resumed run
    starts after its last checkpoint); the sites and on_round see the run's
    rounds. site_wait_s: how long a round waits for all sites to be
    connected (wait_for_sites) before FedAvg samples them."""
    super().__init__(weighted_by_key=settings.COUNT_KEY,
                     arrayrecord_key=settings.ARRAYS_KEY, **kwargs)
    self.centers = list(centers)
    self.on_round = on_round
    self.offset = first_round - 1
    self.site_wait_s = site_wait_s
    self._round_start = time.perf_counter()

  def configure_train(self, server_round, arrays, config, grid):
    wait_for_sites(grid, self.centers, self.site_wait_s,
                   ask=lambda nodes: ask_centers(grid, nodes))
    self._round_start = time.perf_counter()
    return super().configure_train(server_round + self.offset, arrays, config,
                                   grid)

  def aggregate_train(self, server_round, replies):
    server_round += self.offset  # the run's round (configure_train's).
    replies = list(replies)
    failed = [m for m in replies if m.has_error()]
    if failed:
      raise errors.UserError(
          f"round {server_round}: {len(failed)} site(s) failed: "
          + "; ".join(site_reason(m.error.reason) for m in failed))
    sites = [m.content[settings.SITE_KEY] for m in replies]
    answered = [str(s["center"]) for s in sites]
    if sorted(answered) != sorted(self.centers):
      raise errors.UserError(
          f"round {server_round}: the sites that answered are {answered}, the "
          f"run's centers {self.centers}: each center must run exactly one "
          "SuperNode (--node-config center=...) and train every round")
    stale = [str(s["center"]) for s in sites
             if "round" in s and int(s["round"]) != server_round]
    if stale:
      raise errors.UserError(f"round {server_round}: sites {stale} answered "
                             "another round")
    arrays, metrics = super().aggregate_train(server_round, replies)
    per_site = {}
    for site, m in zip(sites, replies):
      [record] = m.content.metric_records.values()
      per_site[str(site["center"])] = {
          **{k: float(v) for k, v in record.items()},
          # The site's seconds (process start and imports, loading data and
          # weights, training) and, with DP, its steps and sampling rate.
          **{k: float(site[k]) for k in _SITE_FIELDS if k in site}}
    epsilons = {c: v[settings.EPSILON_KEY] for c, v in per_site.items()
                if settings.EPSILON_KEY in v}
    if epsilons:
      # FedAvg averaged the sites' epsilons; the run's is the largest.
      metrics[settings.EPSILON_KEY] = max(epsilons.values())
      logs.say("round %d: DP epsilon per site %s, max %.4f", server_round,
               {c: round(e, 4) for c, e in epsilons.items()},
               max(epsilons.values()))
    self.on_round(server_round, arrays, per_site,
                  time.perf_counter() - self._round_start)
    return arrays, metrics


# A site's ConfigRecord fields that go into the metrics row per site.
_SITE_FIELDS = ("start_s", "setup_s", "train_s", "dp_steps", "dp_q")
# Per site only (their mean over sites means nothing).
_PER_SITE_ONLY = ("dp_steps", "dp_q")


def _round_row(round_index: int, centers, per_site: dict, seconds: float) -> dict:
  """The in-job engine's metrics row: means over sites, then per site."""
  row = {"round": round_index, "round_time_s": seconds}
  names = [k for k in per_site[centers[0]] if k != settings.COUNT_KEY]
  for name in names:
    if name == settings.EPSILON_KEY:  # the run's epsilon: the largest.
      row[name] = max(per_site[c][name] for c in centers)
    elif name not in _PER_SITE_ONLY:
      row[name] = sum(per_site[c][name] for c in centers) / len(centers)
  for c in centers:
    row.update({f"{c}/{n}": per_site[c][n] for n in names})
    row[f"{c}/num_examples"] = int(per_site[c][settings.COUNT_KEY])
  return row


# --- Resume ---------------------------------------------------------------------


def run_key(workdir: str, identity: dict, *, fresh: bool = False) -> str:
  """The key the sites keep this run's state under (settings.RUN_KEY).

  sha256 of the run identity and a nonce drawn when the workdir is first
  claimed, kept in WORKDIR/flower_run_key.json: the same across `flwr run`s
  of one run (Flower's run id is not), new for another workdir, for a run
  that replaces an identity without checkpoints, or with `fresh`
  (overwrite).
  """
  from dfgm_jax import stage_io  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256(json.dumps(stage_io.normalise(identity),
                                     sort_keys=True).encode()).hexdigest()
  path = os.path.join(workdir, RUN_KEY_FILE)
  stored = None if fresh else stage_io.read_json(path)
  if stored is not None and stored.get("identity_sha256") == digest:
    return str(stored["run_key"])
  nonce = secrets.token_hex(16)
  key = hashlib.sha256(f"{digest}:{nonce}".encode()).hexdigest()[:32]
  stage_io.write_json(path, {"identity_sha256": digest, "nonce": nonce,
                             "run_key": key})
  return key


@dataclasses.dataclass
class Start:
  """Where a `flwr run` starts: after `rounds_done` rounds, from these
  global params and EMA, the sites' state under `run_key`."""

  rounds_done: int
  params: object
  ema: object
  run_key: str


def resume_point(config, workdir: str, checkpointer, *, overwrite: bool = False) -> Start:
  """The run's start: its newest checkpoint's round and weights, else round
  0 and the in-job engine's initial weights (federated.init_global).

  Raises:
    errors.UserError: the newest checkpoint is the in-job engine's, or the
      workdir has checkpoints but no run key (the sites' states of a Flower
      engine that keyed them by Flower's run id cannot be found).
  """
  from dfgm_jax.train import federated  # pylint: disable=g-import-not-at-top
  _, _, params, ema = federated.init_global(config)
  config_json = json.loads(config.to_json_best_effort())
  identity = federated.run_identity(config_json)
  step, meta = checkpointer.latest_meta()
  if step is None:
    return Start(0, params, ema, run_key(workdir, identity, fresh=overwrite))
  where = f"{checkpointer.directory}/{step}"
  if meta.get("engine") != "flower":
    raise errors.UserError(
        f"{where}: a checkpoint of the in-job engine (launch.train_federated); "
        "the Flower engine resumes only its own (the sites hold their optimizer "
        "states): use another workdir or resume it with launch.train_federated")
  if not os.path.exists(os.path.join(workdir, RUN_KEY_FILE)):
    raise errors.UserError(
        f"{workdir}: holds Flower checkpoints (step {step}) but no "
        f"{RUN_KEY_FILE}, so the sites' optimizer states cannot be found: set "
        "the run config's overwrite=true or use another workdir")
  step, state, meta = checkpointer.restore_latest(
      {"params": params, "ema": ema}, quarantine=True)
  return Start(int(meta["round"]), state["params"], state["ema"],
               run_key(workdir, identity))


def _last_row(workdir: str) -> dict:
  """metrics.jsonl's last row ({} without one)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  for line in reversed(open(path).read().splitlines()):
    try:
      return json.loads(line)
    except ValueError:  # a torn last line (killed mid-write).
      continue
  return {}


def run(config, workdir: str, grid: Grid, *, timeout: float = 3600.0,
        overwrite: bool = False, secure_context=None,
        max_weight: float = 1000.0, site_wait_s: float = SITE_WAIT_S) -> dict:
  """Runs (or resumes) config.fed.rounds rounds of FedAvg over the grid's sites.

  A workdir with checkpoints of this run resumes after the newest (see the
  module docstring); one that holds them all returns at once (finished:
  True) without contacting a site.

  secure_context: the ServerApp's Context to run SecAgg+ (secure.py) with;
  None runs Flower's FedAvg on the sites' plain replies.
  site_wait_s: how long to wait for all sites to be connected (before each
  round; with SecAgg+ before the first), then stop naming the missing.
  Flower's round banners say the run's rounds (logs.run_rounds).

  Returns:
    dict: rounds (done in all), resumed_after (rounds done before this
    call), finished (nothing was left to run), round_s (seconds of each
    round run here), metrics (last row), params, ema (the final global
    ones), run_key.

  Raises:
    errors.RunMismatch: the workdir holds another run.
    errors.UserError: the workdir holds the in-job engine's checkpoints, or
      a round missed a site.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dfgm_jax import stage_io  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import federated  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import loop  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  centers = settings.centers(config)
  tau = config.fed.local_steps
  config_json = json.loads(config.to_json_best_effort())
  loop.claim_workdir(workdir, federated.run_identity(config_json),
                     identity_fn=federated.run_identity,
                     what="a federated training run", overwrite=overwrite,
                     remedy="Set the run config's overwrite=true to delete "
                     "it, or use another workdir.")
  done_path = os.path.join(workdir, DONE_FILE)
  checkpointer = loop.make_checkpointer(workdir, config.train)
  writer = None
  try:
    start = resume_point(config, workdir, checkpointer, overwrite=overwrite)
    template = start.params
    state = {"rounds": start.rounds_done, "resumed_after": start.rounds_done,
             "finished": start.rounds_done >= config.fed.rounds,
             "round_s": [], "metrics": _last_row(workdir),
             "params": start.params, "ema": start.ema, "run_key": start.run_key}
    if state["finished"]:
      logs.say(f"{workdir}: the run already holds {start.rounds_done} rounds "
           f"(config.fed.rounds={config.fed.rounds}); nothing to do")
      if not os.path.exists(done_path):  # killed after its last checkpoint.
        stage_io.write_json(done_path, _done_record(state, tau, centers,
                                                    secure_context is not None))
      return state
    if start.rounds_done:
      logs.say(f"resuming {workdir} after round {start.rounds_done} of "
           f"{config.fed.rounds}")
    if os.path.exists(done_path):  # an extended run is not done until it ends.
      os.remove(done_path)
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.train.tensorboard,
                                       resume_step=start.rounds_done * tau)

    def on_round(server_round, arrays, per_site, seconds):
      new_params, new_ema = settings.from_record(
          arrays, template, f"round {server_round}'s aggregate")
      row = _round_row(server_round, centers, per_site, seconds)
      writer.write(server_round * tau, row)
      checkpointer.save(server_round * tau, {"params": new_params, "ema": new_ema}, {
          "config": config_json, "round": server_round,
          "next_step": server_round * tau, "clients": centers,
          "num_examples": [int(per_site[c][settings.COUNT_KEY]) for c in centers],
          "engine": "flower"}, force=True)
      state.update(rounds=server_round, metrics=row, params=new_params,
                   ema=new_ema)
      state["round_s"].append(seconds)
      logs.say("round %d of %d: %.1fs, loss %.4f", server_round,
               config.fed.rounds, seconds, row.get("loss", float("nan")))

    initial = settings.to_record(start.params, start.ema)
    with logs.run_rounds(start.rounds_done, config.fed.rounds):
      if secure_context is not None:
        wait_for_sites(grid, centers, site_wait_s,
                       ask=lambda nodes: ask_centers(grid, nodes))
        secure.run_rounds(grid, secure_context, centers=centers,
                          initial_record=initial, num_rounds=config.fed.rounds,
                          first_round=start.rounds_done + 1,
                          run_key=start.run_key, timeout=timeout,
                          on_round=on_round, max_weight=max_weight)
      else:
        strategy = SiteFedAvg(centers=centers, on_round=on_round,
                              first_round=start.rounds_done + 1,
                              site_wait_s=site_wait_s,
                              min_train_nodes=len(centers),
                              min_available_nodes=len(centers),
                              fraction_evaluate=0.0)
        strategy.start(grid=grid, initial_arrays=initial,
                       num_rounds=config.fed.rounds - start.rounds_done,
                       timeout=timeout,
                       train_config=ConfigRecord({settings.RUN_KEY: start.run_key}))
  finally:
    loop.close_all(checkpointer, writer)
  if state["rounds"] != config.fed.rounds:
    raise errors.UserError(f"the run ended after round {state['rounds']} of "
                           f"{config.fed.rounds}")
  jax.block_until_ready(state["params"])
  stage_io.write_json(done_path, _done_record(state, tau, centers,
                                              secure_context is not None))
  return state


def _done_record(state: dict, tau: int, centers, secure_aggregation: bool) -> dict:
  """flower_run.json: the run's rounds, and what this `flwr run` did."""
  return {"secure_aggregation": secure_aggregation,
          "rounds": state["rounds"], "step": state["rounds"] * tau,
          "resumed_after": state["resumed_after"], "clients": centers,
          "round_s": state["round_s"], "metrics": state["metrics"]}


@app.main()
def main(grid: Grid, context: Context) -> None:
  """The ServerApp: the run config's config and workdir (settings.py). A
  user error ends the run (Flower marks it failed) after one `error: ...`
  line in its log, which launch.flower_run reports."""
  try:
    _main(grid, context)
  except errors.UserError as e:
    logs.error(str(e))
    raise


def _main(grid: Grid, context: Context) -> None:
  run_config = context.run_config
  workdir = str(run_config.get("workdir", ""))
  if not workdir:
    raise errors.ConfigError("run config workdir: empty; set the server's "
                             "workdir, e.g. flwr run . <federation> -c "
                             "\"workdir='/abs/path'\"")
  workdir = os.path.abspath(workdir)
  config = settings.load_config(run_config)
  settings.use_compilation_cache(str(run_config.get(
      "cache-dir", "") or os.path.join(workdir, "xla_cache")))
  use_secure = bool(run_config.get("secure-aggregation", False))
  result = run(config, workdir, grid,
               timeout=float(run_config.get("round-timeout", 3600)),
               overwrite=bool(run_config.get("overwrite", False)),
               secure_context=context if use_secure else None,
               max_weight=float(run_config.get("secagg-max-weight",
                                               secure.MAX_WEIGHT)),
               site_wait_s=float(run_config.get("site-wait", SITE_WAIT_S)))
  logs.say("Flower federated training done: %d rounds (%d run now, after %d), "
           "%s s a round; checkpoints in %s", result["rounds"],
           len(result["round_s"]), result["resumed_after"],
           [round(s, 1) for s in result["round_s"]], workdir)
