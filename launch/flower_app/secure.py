"""Secure aggregation (SecAgg+) for the Flower app: run config
secure-aggregation=true.

Flower 1.42 runs SecAgg+ only in its legacy server path: a LegacyContext
with a legacy FedAvg and DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)
on the server, secaggplus_mod around the ClientApp. Per round the server
sends four messages to each site (setup, share keys, collect masked
vectors, unmask); only the third runs the site's training. Each site
uploads its n_k-weighted parameters and EMA, clipped to +-clipping_range,
stochastically quantized to quantization_range levels and masked with
pairwise and private masks; the server only ever holds the masked sum and
unmasks the weighted average (it still sees each site's count n_k and its
metrics: loss, epsilon).

The legacy messages carry the arrays as a list in the wire order
(settings.record_keys) and the round in the FitIns config; the site replies
a FitRes (its metrics with its center), which this module converts.
"""

from __future__ import annotations

import time

from dfgm_jax import errors
from launch.flower_app import logs
from launch.flower_app import settings

# SecAgg+ settings (the run config's keys and defaults; SecAggPlusWorkflow's).
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MAX_WEIGHT = 1000.0


def error_bound(num_sites: int, total_examples: int, *,
                clipping_range: float = CLIPPING_RANGE,
                quantization_range: int = QUANTIZATION_RANGE,
                max_weight: float = MAX_WEIGHT) -> float:
  """The largest error of an aggregated value from the quantization.

  Each site quantizes w_k x with w_k = n_k / max_weight on a grid of step
  2 c / Q with stochastic rounding (at most one step off); the server
  divides the sum by sum_k w_k (quantized alike, relative error 1 / (w Q)).
  """
  step = 2 * clipping_range / quantization_range
  weight_sum = total_examples / max_weight
  return num_sites * step / weight_sum + clipping_range * num_sites / (
      weight_sum * quantization_range)


# --- The site ---------------------------------------------------------------------


def is_secure_message(msg) -> bool:
  from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # pylint: disable=g-import-not-at-top
  return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_mod(msg, ctxt, call_next):
  """secaggplus_mod for SecAgg+ messages; others go to the app directly (a
  run without secure aggregation)."""
  from flwr.app.message_type import MessageType  # pylint: disable=g-import-not-at-top
  from flwr.client.mod import secaggplus_mod  # pylint: disable=g-import-not-at-top
  if msg.metadata.message_type == MessageType.TRAIN and is_secure_message(msg):
    return secaggplus_mod(msg, ctxt, call_next)
  return call_next(msg, ctxt)


def is_legacy_fit(content) -> bool:
  return "fitins.config" in content.config_records


def legacy_fit(content) -> tuple[list, int, str | None]:
  """(arrays in wire order, round index from 0, run key) of a legacy FitIns."""
  from flwr.common import parameters_to_ndarrays  # pylint: disable=g-import-not-at-top
  from flwr.compat.common import recorddict_compat as compat  # pylint: disable=g-import-not-at-top
  fitins = compat.recorddict_to_fitins(content, keep_input=True)
  return (parameters_to_ndarrays(fitins.parameters),
          int(fitins.config["server-round"]) - 1,
          fitins.config.get(settings.RUN_KEY))


def legacy_reply(record, num_examples: int, metrics: dict, site: dict):
  """The FitRes RecordDict: the arrays (settings.to_record's order), the
  count, and the metrics with the site's fields (center, seconds)."""
  from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # pylint: disable=g-import-not-at-top
  from flwr.compat.common import recorddict_compat as compat  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # secaggplus_mod clips w * x to +-CLIPPING_RANGE silently; refuse instead.
  largest = max(float(np.abs(record[k].numpy()).max()) for k in record.keys())
  if largest > CLIPPING_RANGE:
    raise errors.UserError(
        f"secure aggregation: a parameter of magnitude {largest:.3g} exceeds "
        f"SecAgg+'s clipping range {CLIPPING_RANGE}; run without "
        "secure-aggregation")
  fitres = FitRes(
      status=Status(Code.OK, ""),
      parameters=ndarrays_to_parameters([record[k].numpy() for k in record.keys()]),
      num_examples=int(num_examples),
      metrics={**{k: v for k, v in metrics.items() if k != settings.COUNT_KEY},
               **site})
  return compat.fitres_to_recorddict(fitres, keep_input=True)


# --- The server -------------------------------------------------------------------


def _failure(failure) -> str:
  """A legacy failure (an exception, or a (proxy, FitRes) pair) as one line:
  a site's own reason is its SiteFailure text (server_app.site_reason)."""
  from launch.flower_app import server_app  # pylint: disable=g-import-not-at-top
  return server_app.site_reason(str(failure))


def _strategy_class():
  from flwr.server.strategy import FedAvg as LegacyFedAvg  # pylint: disable=g-import-not-at-top

  class SecureSiteFedAvg(LegacyFedAvg):
    """The legacy FedAvg whose aggregate is SecAgg+'s: every result carries
    the unmasked weighted average; checks every center answered."""

    def __init__(self, *, centers, keys, on_round, max_weight, offset=0,
                 **kwargs):
      super().__init__(**kwargs)
      self.offset = offset  # the run's round = the workflow's + offset.
      self.max_weight = max_weight
      self.centers = list(centers)
      self.keys = list(keys)
      self.on_round = on_round
      self._round_start = time.perf_counter()

    def configure_fit(self, server_round, parameters, client_manager):
      self._round_start = time.perf_counter()
      return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
      from flwr.app import Array, ArrayRecord  # pylint: disable=g-import-not-at-top
      from flwr.common import parameters_to_ndarrays  # pylint: disable=g-import-not-at-top
      server_round += self.offset
      if failures:
        raise errors.UserError(
            f"round {server_round}: {len(failures)} site(s) failed: "
            + "; ".join(_failure(f) for f in failures))
      answered = [str(fit.metrics.get("center")) for _, fit in results]
      if sorted(answered) != sorted(self.centers):
        raise errors.UserError(
            f"round {server_round}: the sites that answered are {answered}, "
            f"the run's centers {self.centers}")
      over = {str(fit.metrics["center"]): fit.num_examples for _, fit in results
              if fit.num_examples > self.max_weight}
      if over:  # their w * x overflowed the clipping range.
        raise errors.UserError(
            f"round {server_round}: sites {over} have more slices than the run "
            f"config's secagg-max-weight={self.max_weight}; raise it")
      # SecAgg+ set every result's parameters to the weighted average.
      parameters = results[0][1].parameters
      arrays = ArrayRecord({k: Array(v.astype("float32")) for k, v in zip(
          self.keys, parameters_to_ndarrays(parameters), strict=True)})
      per_site = {}
      for _, fit in results:
        center = str(fit.metrics["center"])
        per_site[center] = {settings.COUNT_KEY: float(fit.num_examples), **{
            k: float(v) for k, v in fit.metrics.items()
            if k not in ("center", "client-index", "round")
            and isinstance(v, (int, float))}}
      self.on_round(server_round, arrays, per_site,
                    time.perf_counter() - self._round_start)
      return parameters, {}

  return SecureSiteFedAvg


def _workflow_class():
  from flwr.server.workflow import SecAggPlusWorkflow  # pylint: disable=g-import-not-at-top

  class Workflow(SecAggPlusWorkflow):
    """SecAgg+ that stops the run when a site fails in its training stage
    (the stock workflow only logs 'halted' and skips the round)."""

    def collect_masked_vectors_stage(self, grid, context, state):
      ok = super().collect_masked_vectors_stage(grid, context, state)
      if state.failures:
        raise errors.UserError(
            f"secure aggregation: {len(state.failures)} site(s) failed: "
            + "; ".join(_failure(f) for f in state.failures))
      return ok

  return Workflow


def run_rounds(grid, context, *, centers, initial_record, num_rounds: int,
               timeout: float, on_round, max_weight: float = MAX_WEIGHT,
               first_round: int = 1, run_key: str = "") -> None:
  """Rounds first_round .. num_rounds of FedAvg with SecAgg+ over the
  grid's sites (a resumed run starts after its last checkpoint); each
  FitIns carries the run's round and the run key (settings.RUN_KEY)."""
  from flwr.common import ndarrays_to_parameters  # pylint: disable=g-import-not-at-top
  from flwr.server import LegacyContext, ServerConfig  # pylint: disable=g-import-not-at-top
  from flwr.server.workflow import DefaultWorkflow  # pylint: disable=g-import-not-at-top
  keys = list(initial_record.keys())
  k = len(centers)
  offset = first_round - 1
  strategy = _strategy_class()(
      centers=centers, keys=keys, on_round=on_round, max_weight=max_weight,
      offset=offset, fraction_fit=1.0,
      fraction_evaluate=0.0, min_fit_clients=k, min_evaluate_clients=0,
      min_available_clients=k, accept_failures=False,
      on_fit_config_fn=lambda r: {"server-round": r + offset,
                                  settings.RUN_KEY: run_key},
      initial_parameters=ndarrays_to_parameters(
          [initial_record[key].numpy() for key in keys]))
  legacy = LegacyContext(context, config=ServerConfig(
      num_rounds=num_rounds - offset, round_timeout=timeout),
                         strategy=strategy)
  workflow = DefaultWorkflow(fit_workflow=_workflow_class()(
      # Shares to every site, all needed (floats: proportions of the sites;
      # the integer form refuses K <= 2).
      num_shares=1.0, reconstruction_threshold=1.0, max_weight=max_weight,
      clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
      timeout=timeout))
  logs.say("secure aggregation (SecAgg+) over %d sites, rounds %d to %d", k,
           first_round, num_rounds)
  workflow(grid, legacy)
