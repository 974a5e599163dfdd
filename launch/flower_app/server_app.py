"""The Flower ServerApp: FedAvg of G1 over the sites, weighted by private counts.

The global parameters and EMA start as the in-job engine's
(federated.init_global: the config's seed) and travel as one ArrayRecord
(settings.py). Flower's FedAvg averages every array of the sites' replies
with weights n_k / sum n, n_k the site's private slice count (its
MetricRecord's settings.COUNT_KEY): parameters and EMA alike, as
federated.aggregate does. config.fed.rounds rounds, every site every round
(min_train_nodes = min_available_nodes = K = len(config.fed.centers)); no
federated evaluation.

The server's workdir (run config `workdir`) gets what the in-job engine
writes: a checkpoint per round (checkpoints/<rounds x tau>: `state`
{params, ema}, `meta` {config, round, clients, num_examples}), so
launch.export_model --model_dir=WORKDIR exports the global EMA and
Denoiser.load reads it; metrics.jsonl (a row per round: the sites' mean and
per-center loss, grad_norm, num_examples, round_time_s); run.json (the
run's identity); and flower_run.json when all rounds are done. A round that
misses a site, or hears one center twice, stops the run (the sites'
optimizer states and the weights assume all K every round); so does a site
that fails, e.g. a DP site whose budget the run would exceed (its refusal
is the error the server raises; the rounds before it keep their
checkpoints).

DP-SGD (config.dp.enabled) runs at the sites (client_app.py): each reports
its own epsilon (its MetricRecord's settings.EPSILON_KEY); the metrics row
has '<center>/dp_epsilon' (and the site's q and steps) per site and
dp_epsilon = their max, as the in-job engine's; the aggregate MetricRecord
FedAvg returns gets the max in place of its weighted mean.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from dfgm_jax import errors
from launch.flower_app import secure
from launch.flower_app import settings

app = ServerApp()


class SiteFedAvg(FedAvg):
  """Flower's FedAvg (weighted by settings.COUNT_KEY) that checks every
  center answered each round and records the round: a checkpoint, a
  metrics row."""

  def __init__(self, *, centers, on_round, **kwargs):
    super().__init__(weighted_by_key=settings.COUNT_KEY,
                     arrayrecord_key=settings.ARRAYS_KEY, **kwargs)
    self.centers = list(centers)
    self.on_round = on_round
    self._round_start = time.perf_counter()

  def configure_train(self, server_round, arrays, config, grid):
    self._round_start = time.perf_counter()
    return super().configure_train(server_round, arrays, config, grid)

  def aggregate_train(self, server_round, replies):
    replies = list(replies)
    failed = [m for m in replies if m.has_error()]
    if failed:
      raise errors.UserError(
          f"round {server_round}: {len(failed)} site(s) failed: "
          + "; ".join(m.error.reason[:1500] for m in failed))
    sites = [m.content[settings.SITE_KEY] for m in replies]
    answered = [str(s["center"]) for s in sites]
    if sorted(answered) != sorted(self.centers):
      raise errors.UserError(
          f"round {server_round}: the sites that answered are {answered}, the "
          f"run's centers {self.centers}: each center must run exactly one "
          "SuperNode (--node-config center=...) and train every round")
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
      logging.info("round %d: DP epsilon per site %s, max %.4f", server_round,
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


def run(config, workdir: str, grid: Grid, *, timeout: float = 3600.0,
        overwrite: bool = False, secure_context=None,
        max_weight: float = 1000.0) -> dict:
  """Runs config.fed.rounds rounds of FedAvg over the grid's sites.

  secure_context: the ServerApp's Context to run SecAgg+ (secure.py) with;
  None runs Flower's FedAvg on the sites' plain replies.

  Returns:
    dict: rounds, round_s (seconds of each round), metrics (last row),
    params, ema (the final global ones).

  Raises:
    errors.RunMismatch: the workdir holds another run.
    errors.UserError: the workdir holds checkpoints of this run (the Flower
      engine does not resume: the sites' optimizer states belong to that
      Flower run), or a round missed a site.
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
  _, _, params, ema = federated.init_global(config)
  template = params
  checkpointer = loop.make_checkpointer(workdir, config.train)
  writer = None
  state = {"rounds": 0, "round_s": [], "metrics": {}, "params": params, "ema": ema}
  try:
    if checkpointer.latest_step() is not None:
      raise errors.UserError(
          f"{workdir}: holds checkpoints of this run (step "
          f"{checkpointer.latest_step()}); the Flower engine does not resume "
          "(the sites' optimizer states belong to that Flower run): set the "
          "run config's overwrite=true or use another workdir")
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.train.tensorboard)

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
      logging.info("round %d of %d: %.1fs, loss %.4f", server_round,
                   config.fed.rounds, seconds, row.get("loss", float("nan")))

    if secure_context is not None:
      secure.run_rounds(grid, secure_context, centers=centers,
                        initial_record=settings.to_record(params, ema),
                        num_rounds=config.fed.rounds, timeout=timeout,
                        on_round=on_round, max_weight=max_weight)
    else:
      strategy = SiteFedAvg(centers=centers, on_round=on_round,
                            min_train_nodes=len(centers),
                            min_available_nodes=len(centers),
                            fraction_evaluate=0.0)
      strategy.start(grid=grid,
                     initial_arrays=settings.to_record(params, ema),
                     num_rounds=config.fed.rounds, timeout=timeout,
                     train_config=ConfigRecord({}))
  finally:
    loop.close_all(checkpointer, writer)
  if state["rounds"] != config.fed.rounds:
    raise errors.UserError(f"the run ended after round {state['rounds']} of "
                           f"{config.fed.rounds}")
  jax.block_until_ready(state["params"])
  stage_io.write_json(os.path.join(workdir, "flower_run.json"), {
      "secure_aggregation": secure_context is not None,
      "rounds": state["rounds"], "step": state["rounds"] * tau,
      "clients": centers, "round_s": state["round_s"],
      "metrics": state["metrics"]})
  return state


@app.main()
def main(grid: Grid, context: Context) -> None:
  """The ServerApp: the run config's config and workdir (settings.py)."""
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
                                               secure.MAX_WEIGHT)))
  logging.info("Flower federated training done: %d rounds, %s s a round; "
               "checkpoints in %s", result["rounds"],
               [round(s, 1) for s in result["round_s"]], workdir)
