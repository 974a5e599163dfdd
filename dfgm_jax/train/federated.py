"""Federated training of G1: FedAvg's client update and aggregation, and the
in-job engine that runs K clients in one process (ALGORITHM.md 6).

Banner sections: the federated core (plain functions on parameter trees, no
I/O, what a Flower ClientApp/ServerApp calls), then the in-job engine
(workdir, per-round orbax checkpoints, resume, metrics).

A client's local training is the central trainer's update step
(diffusion.make_train_step) on the client's state {step, params, ema,
opt_state, key}: it starts each round from the global parameters and EMA,
keeps its own AdamW state across rounds, runs tau steps on batches of its
private slices mixed with the public healthy set, and reports its private
example count n_k. The server averages parameters and EMA alike with weights
n_k / sum n. Randomness: the client's key is fold_in(fold_in(root, round),
client) with root the central trainer's key (seed + 1), and each step folds
in the client's step count (round * tau + i), which also drives the EMA
warm-up and (through the optimizer's own count) the learning-rate warm-up.
So one client and one round is exactly tau steps of central training with
that key.

FedProx: the proximal term mu/2 |theta_k - theta|^2 is applied decoupled
from the data gradient: before every local step, theta_k -= lr_t * mu *
(theta_k - theta), the term's gradient step (as AdamW applies weight decay
beside Adam rather than through it). It leaves the shared update step
untouched; with plain SGD it is FedProx's update exactly. mu = 0 is FedAvg
bit for bit (the pull is then exactly zero).

DP-SGD (config.dp.enabled): each client's batches come from its own DP
sampler (dp.PoissonSampler over its center's patients) and its local steps
are the central DP step (clipping per unit, Gaussian noise). Every client
is accounted on its own: its epsilon after r rounds is that of r x tau
steps at its own sampling rate, written per round as '<center>/dp_epsilon'
(and the clients' largest as 'dp_epsilon'); a run whose fed.rounds x tau
steps exceed dp.target_epsilon for any client is refused before it starts,
naming the client. The clients' unit slots are padded to the largest, so
their batches stack (the stacked engine) and every client's plan is the one
its sampler draws with.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dfgm_jax import checkpoint as ckpt_lib
from dfgm_jax import config_checks
from dfgm_jax import errors
from dfgm_jax import parallel
from dfgm_jax import stage_io
from dfgm_jax.train import diffusion
from dfgm_jax.train import loop
from dfgm_jax.train import metrics as metrics_lib

ENGINES = ("auto", "stacked", "sequential")

# --- The federated core: state, keys, local steps --------------------------------


class ClientUpdate(NamedTuple):
  """What a client sends back after a round (and keeps: opt_state).

  With the stacked engine every array leaf has a leading client axis,
  num_examples is a tuple and metrics a list, one entry per client.
  """

  params: Any
  ema: Any
  opt_state: Any
  num_examples: Any  # n_k: the private tumor slices the client draws from.
  metrics: Any  # {name: float}, means over the round's local steps.


def init_global(config) -> tuple[Any, Any, Any, Any]:
  """(graphdef, rest, params, ema): the central trainer's initialisation."""
  graphdef, rest, state = diffusion.init_state(config)
  return graphdef, rest, state["params"], state["ema"]


def init_opt_state(config, params):
  """A client's fresh AdamW state (made once, then kept across rounds)."""
  return diffusion.make_optimizer(config.train).init(params)


def root_key(config) -> jax.Array:
  """The central trainer's key (diffusion.init_state: seed + 1)."""
  return jax.random.key(config.seed + 1)


def client_key(config, round_index: int, client_index: int) -> jax.Array:
  """fold_in(fold_in(root, round), client), as key data (uint32)."""
  key = jax.random.fold_in(jax.random.fold_in(root_key(config), round_index),
                           client_index)
  return jax.random.key_data(key)


def make_local_steps(graphdef, rest, config) -> Callable:
  """local(state, anchor, batches) -> (state, metrics): k local steps.

  `state` is a client state (client_state: the central trainer's state plus
  its FedProx strength `mu`), `anchor` the round's global parameters,
  `batches` k stacked steps as the central step takes them. Each step is
  the central trainer's step after the proximal pull toward the anchor,
  which is the identity for mu = 0 (p - 0 * (p - g) = p, bit for bit). mu
  is traced, so one program serves every mu. Pure and unjitted: jit it as
  is (sequential) or under jax.vmap over clients (stacked).
  """
  train_step = diffusion.make_train_step(graphdef, rest, config)
  t = config.train

  def one(state, anchor, batch):
    lr = diffusion.learning_rate(t, state["step"])
    pull = lr * state["mu"]
    params = jax.tree.map(lambda p, g: p - pull * (p - g), state["params"], anchor)
    return train_step(dict(state, params=params),
                      jax.tree.map(lambda x: x[None], batch))

  def local(state, anchor, batches):
    if batches["image"].shape[0] == 1:  # no loop (see make_train_step).
      return one(state, anchor, jax.tree.map(lambda x: x[0], batches))
    state, metrics = jax.lax.scan(lambda s, b: one(s, anchor, b), state, batches)
    return state, jax.tree.map(jnp.mean, metrics)

  return local


def client_program(graphdef, rest, config) -> Callable:
  """make_local_steps jitted for client_update, the client state donated
  (compiled on its first call); one per process, reused every round."""
  return jax.jit(make_local_steps(graphdef, rest, config), donate_argnums=0)


def client_state(config, params, ema, opt_state, *, round_index: int,
                 client_index: int) -> dict:
  """A client's state at the start of a round: fresh copies of the global
  parameters and EMA (the local program updates its state in place)."""
  return {
      "step": jnp.asarray(round_index * config.fed.local_steps, jnp.int32),
      "mu": jnp.asarray(config.fed.fedprox_mu, jnp.float32),
      "params": jax.tree.map(jnp.array, params),
      "ema": jax.tree.map(jnp.array, ema),
      "opt_state": opt_state,
      "key": client_key(config, round_index, client_index),
  }


def _round_steps(config, round_index: int) -> range:
  """The first step of each dispatch of a round (k = train.steps_per_dispatch)."""
  tau, k = config.fed.local_steps, config.train.steps_per_dispatch
  return range(round_index * tau, (round_index + 1) * tau, k)


def _mean_metrics(totals, dispatches: int) -> Any:
  return jax.tree.map(lambda v: np.asarray(v, np.float64) / dispatches,
                      jax.device_get(totals))


def client_update(local_fn: Callable, config, params, ema, opt_state,
                  batch_fn: Callable[[int], dict], *, round_index: int,
                  client_index: int, num_examples: int) -> ClientUpdate:
  """One client's round: tau local steps from the global params and EMA.

  Args:
    local_fn: client_program(...) (make_local_steps jitted, the state
      donated) or its compiled form; built once per process.
    config: the run's config (fed.local_steps, train.steps_per_dispatch).
    params, ema: the round's global parameters and EMA (left intact).
    opt_state: the client's optimizer state from its previous round
      (init_opt_state before its first).
    batch_fn: step -> the client's batch for that step (numpy dict: image,
      mask, is_tumor), a pure function of the step (launch.train_data's
      client samplers), steps round * tau ... (round + 1) * tau - 1.
    round_index, client_index: the RNG's fold_in (and the step count).
    num_examples: the client's private example count n_k, passed through.

  Returns:
    ClientUpdate with the client's parameters, EMA and optimizer state and
    its metrics (loss, grad_norm, lr: means over the round's steps).
  """
  state = client_state(config, params, ema, opt_state, round_index=round_index,
                       client_index=client_index)
  k = config.train.steps_per_dispatch
  steps = _round_steps(config, round_index)
  totals = None
  for step in steps:
    batches = jax.tree.map(jnp.asarray, loop.stack_batches(batch_fn, step, k))
    state, metrics = local_fn(state, params, batches)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
  metrics = {n: float(v) for n, v in _mean_metrics(totals, len(steps)).items()}
  return ClientUpdate(state["params"], state["ema"], state["opt_state"],
                      int(num_examples), metrics)


@jax.jit
def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack(trees: Sequence) -> Any:
  """K trees -> one tree with a leading client axis."""
  return _stack(list(trees))


def unstack(tree, index: int) -> Any:
  return jax.tree.map(lambda x: x[index], tree)


@functools.partial(jax.jit, static_argnums=1)
def _repeat(tree, num_clients: int):
  """num_clients copies of every leaf, stacked (one program, not one per leaf)."""
  return jax.tree.map(
      lambda x: jnp.repeat(jnp.asarray(x)[None], num_clients, axis=0), tree)


def stacked_update(stacked_fn: Callable, config, params, ema, opt_states,
                   batch_fns: Sequence[Callable[[int], dict]], *,
                   round_index: int, num_examples: Sequence[int]) -> ClientUpdate:
  """All K clients' round in one program: client_update vmapped over clients.

  Args:
    stacked_fn: jax.jit(jax.vmap(make_local_steps(...), in_axes=(0, None,
      0)), donate_argnums=0), or its compiled form.
    opt_states: the clients' optimizer states, stacked (leading axis K).
    batch_fns: one per client, as client_update's batch_fn.
    Others: as client_update.

  Returns:
    ClientUpdate whose leaves have a leading client axis; num_examples a
    tuple and metrics a list of per-client dicts.
  """
  num_clients = len(batch_fns)
  state = {
      "step": jnp.full((num_clients,), round_index * config.fed.local_steps,
                       jnp.int32),
      "mu": jnp.full((num_clients,), config.fed.fedprox_mu, jnp.float32),
      "params": _repeat(params, num_clients), "ema": _repeat(ema, num_clients),
      "opt_state": opt_states,
      "key": jnp.stack([client_key(config, round_index, c)
                        for c in range(num_clients)]),
  }
  k = config.train.steps_per_dispatch
  steps = _round_steps(config, round_index)
  totals = None
  for step in steps:
    local = [loop.stack_batches(fn, step, k) for fn in batch_fns]
    batches = {name: jnp.asarray(np.stack([b[name] for b in local]))
               for name in local[0]}
    state, metrics = stacked_fn(state, params, batches)
    totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
  means = _mean_metrics(totals, len(steps))
  per_client = [{n: float(v[c]) for n, v in means.items()}
                for c in range(num_clients)]
  return ClientUpdate(state["params"], state["ema"], state["opt_state"],
                      tuple(int(n) for n in num_examples), per_client)


# --- The federated core: aggregation ---------------------------------------------


def weights(counts: Sequence[float]) -> np.ndarray:
  """n_k / sum n (float32); refuses negative counts or a zero total."""
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any() or counts.sum() <= 0:
    raise ValueError(f"client example counts {counts.tolist()}: need one "
                     "non-negative count per client and a positive total")
  return (counts / counts.sum()).astype(np.float32)


@jax.jit
def _weighted_sum(w, tree):
  """sum_k w[k] * leaf[k] over the leading client axis, leaf by leaf.

  One jitted program for both entry points (compiled once per tree
  structure), so the stacked and the sequential engines aggregate
  bit-identically.
  """
  def leaf(x):
    x = x.astype(jnp.float32)
    out = w[0] * x[0]
    for k in range(1, x.shape[0]):
      out = out + w[k] * x[k]
    return out
  return jax.tree.map(leaf, tree)


def aggregate(trees: Sequence, counts: Sequence[float]) -> Any:
  """FedAvg: sum_k (n_k / sum n) tree_k, leaf by leaf.

  Args:
    trees: one pytree per client (e.g. {"params": ..., "ema": ...}; arrays
      of jax or numpy), all of one structure.
    counts: the clients' private example counts n_k.
  """
  w = weights(counts)
  if len(trees) != len(w):
    raise ValueError(f"{len(trees)} client trees but {len(w)} counts")
  return aggregate_stacked(stack(trees), counts)


def aggregate_stacked(tree, counts: Sequence[float]) -> Any:
  """aggregate() of a tree whose leaves have a leading client axis."""
  w = weights(counts)
  sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
  if sizes != {len(w)}:
    raise ValueError(f"client axes of sizes {sorted(sizes)} but {len(w)} counts")
  return _weighted_sum(jnp.asarray(w), tree)


# --- Run identity ------------------------------------------------------------------

# fed fields that may change within one run: how long, and how the clients'
# updates are scheduled (stacked and sequential agree to float tolerance).
_FREE_FED = ("rounds", "engine")


def run_identity(config: dict) -> dict:
  """The defining fields of a federated run's config (as JSON).

  The central trainer's identity, less train.center (the clients come from
  fed.centers, stored resolved), plus the fed section.
  """
  identity = diffusion.run_identity(config)
  if isinstance(identity.get("train"), dict):
    identity["train"].pop("center", None)
  fed = config.get("fed") or {}
  identity["fed"] = {k: v for k, v in fed.items() if k not in _FREE_FED}
  return stage_io.normalise(identity)


# --- The in-job engine -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Client:
  """A client of the in-job engine: its name, batches and private count."""

  name: str
  batch_fn: Callable[[int], dict]
  num_examples: int
  # With config.dp.enabled: the client's DP sampling plan (dp.Sampling).
  # train() takes it from batch_fn.__self__ (batch_fn must be a
  # dp.PoissonSampler's batch) after padding the clients' slots (dp_clients).
  dp_sampling: Any = None


# --- DP-SGD clients ----------------------------------------------------------------


def _dp_sampler(client: Client):
  sampler = getattr(client.batch_fn, "__self__", None)
  if getattr(sampler, "dp_sampling", None) is None:
    raise errors.ConfigError(
        f"config.dp.enabled=True: client {client.name}'s batches must come from "
        "a DP sampler (dfgm_jax.train.dp.make_sampler; "
        "launch/train_data.make_clients builds them)")
  return sampler


def dp_clients(clients: Sequence[Client]) -> list[Client]:
  """The clients with their DP plans, unit slots padded to the largest.

  Every client's sampler then fills max_units = the clients' largest (its
  truncation only rarer), so all clients' batches have one shape and stack;
  each client's plan (dp_sampling) is the padded one its sampler draws with.
  """
  samplers = [_dp_sampler(c) for c in clients]
  slots = max(s.dp_sampling.max_units for s in samplers)
  out = []
  for c, sampler in zip(clients, samplers):
    if sampler.dp_sampling.max_units != slots:
      sampler.dp_sampling = dataclasses.replace(sampler.dp_sampling,
                                                max_units=slots)
    out.append(dataclasses.replace(c, dp_sampling=sampler.dp_sampling))
  return out


def dp_accountants(config, clients: Sequence[Client]) -> list:
  """One accountant per client (its own sampling rate); refuses the run when
  fed.rounds x fed.local_steps steps exceed dp.target_epsilon for a client.

  Raises:
    errors.ConfigError: naming the client, its epsilon and the most steps.
  """
  from dfgm_jax.train import dp as dp_lib  # pylint: disable=g-import-not-at-top
  fed = config.fed
  steps = fed.rounds * fed.local_steps
  accountants = []
  for c in clients:
    accountant = dp_lib.accountant_for(config, c.dp_sampling)
    try:
      eps = dp_lib.check_budget(
          config, accountant, steps, multiple=fed.local_steps,
          steps_field=(f"config.fed.rounds={fed.rounds} x "
                       f"config.fed.local_steps={fed.local_steps}"))
    except errors.ConfigError as e:
      raise errors.ConfigError(f"client {c.name}: {e}") from None
    logging.info("DP client %s: %s; epsilon %.3f after %d steps (delta %g)",
                 c.name, c.dp_sampling, eps, steps, config.dp.delta)
    accountants.append(accountant)
  return accountants


def _dp_epsilons(row: dict, clients, accountants, step: int) -> None:
  """Adds '<center>/dp_epsilon' after `step` steps and their max to `row`."""
  eps = [a.epsilon(step) for a in accountants]
  for c, e in zip(clients, eps):
    row[f"{c.name}/dp_epsilon"] = e
  row["dp_epsilon"] = max(eps)


def _validate(config, clients: Sequence[Client]) -> None:
  fed, t = config.fed, config.train
  if fed.local_steps % t.steps_per_dispatch:
    raise errors.ConfigError(
        f"config.fed.local_steps={fed.local_steps}: must be a multiple of "
        f"config.train.steps_per_dispatch={t.steps_per_dispatch}")
  if not clients:
    raise errors.ConfigError("config.fed.centers: no clients to train")
  names = [c.name for c in clients]
  if len(set(names)) != len(names):
    raise errors.ConfigError(f"config.fed.centers={','.join(names)}: a center "
                             "appears twice")
  for c in clients:
    if c.num_examples <= 0:
      raise errors.ConfigError(f"client {c.name}: no private tumor slices")
  if jax.process_count() > 1:
    raise errors.ConfigError(
        "the in-job federated engine runs in one process; run one process "
        f"(not {jax.process_count()}) or the Flower deployment")


def _abstract(tree) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _example_batches(config, clients, stacked: bool) -> dict:
  local = loop.stack_batches(clients[0].batch_fn, 0, config.train.steps_per_dispatch)
  lead = (len(clients),) if stacked else ()
  return {n: jax.ShapeDtypeStruct(lead + v.shape, v.dtype) for n, v in local.items()}


def _compile(fn, state, anchor, batches, what: str):
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0).lower(
      _abstract(state), _abstract(anchor), batches).compile()
  seconds = time.perf_counter() - start
  logging.info("%s client program compiled in %.1fs", what, seconds)
  return compiled, seconds


def _fits_memory(compiled) -> bool:
  """Whether the compiled program's buffers fit the device's free memory
  (True where the backend reports no limit, e.g. CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend has them)
    return True
  if "bytes_limit" not in stats or analysis is None:
    return True
  need = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes
          + analysis.argument_size_in_bytes - analysis.alias_size_in_bytes)
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return need <= 0.9 * free


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def compile_programs(config, graphdef, rest, params, ema, opt_states, clients,
                     engine: str) -> tuple[str, Callable, float]:
  """(engine used, compiled program, compile seconds) for the round loop.

  auto: stacked on CPU, where one vmapped program beat K programs (demo
  config, 2 clients, 10 local steps: 19 s against 27 s a round), unless it
  does not fit the memory (or its compile runs out of it); sequential on
  accelerators, where the vmapped convolutions (K weight sets: grouped
  convolutions) were slower (H200, default config at 128 px, batch 32, 2
  clients, 50 local steps: 18.3 s stacked against 14.2 s a round).
  """
  local = make_local_steps(graphdef, rest, config)
  if engine == "auto" and jax.default_backend() != "cpu":
    engine = "sequential"
  if engine in ("auto", "stacked"):
    lead = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct((len(clients),) + x.shape, x.dtype), tree)
    state = {"step": jnp.zeros((len(clients),), jnp.int32),
             "mu": jnp.zeros((len(clients),), jnp.float32),
             "params": lead(params), "ema": lead(ema), "opt_state": opt_states,
             "key": jnp.stack([client_key(config, 0, c)
                               for c in range(len(clients))])}
    try:
      compiled, seconds = _compile(
          jax.vmap(local, in_axes=(0, None, 0)), state, params,
          _example_batches(config, clients, stacked=True), "stacked")
      if engine == "stacked" or _fits_memory(compiled):
        return "stacked", compiled, seconds
      logging.warning("the stacked program of %d clients does not fit the "
                      "device's memory; running them one after another",
                      len(clients))
    except Exception as e:  # pylint: disable=broad-except
      if engine == "stacked" or not _is_oom(e):
        raise
      logging.warning("the stacked program ran out of memory compiling (%s); "
                      "running the clients one after another", str(e)[:200])
  state = client_state(config, params, ema, unstack(opt_states, 0),
                       round_index=0, client_index=0)
  compiled, seconds = _compile(local, state, params,
                               _example_batches(config, clients, stacked=False),
                               "sequential")
  return "sequential", compiled, seconds


def run_round(engine: str, program: Callable, config, params, ema, opt_states,
              clients: Sequence[Client], round_index: int):
  """One FedAvg round: ((params, ema), opt_states, per-client metrics)."""
  counts = [c.num_examples for c in clients]
  if engine == "stacked":
    up = stacked_update(program, config, params, ema, opt_states,
                        [c.batch_fn for c in clients], round_index=round_index,
                        num_examples=counts)
    new = aggregate_stacked({"params": up.params, "ema": up.ema}, counts)
    return new, up.opt_state, up.metrics
  updates = [client_update(program, config, params, ema, unstack(opt_states, i),
                           c.batch_fn, round_index=round_index, client_index=i,
                           num_examples=c.num_examples)
             for i, c in enumerate(clients)]
  new = aggregate([{"params": u.params, "ema": u.ema} for u in updates], counts)
  return new, stack([u.opt_state for u in updates]), [u.metrics for u in updates]


def _round_row(round_index: int, clients, client_metrics, seconds: float) -> dict:
  row = {"round": round_index + 1, "round_time_s": seconds}
  for name in client_metrics[0]:
    row[name] = float(np.mean([m[name] for m in client_metrics]))
  for c, m in zip(clients, client_metrics):
    row.update({f"{c.name}/{n}": v for n, v in m.items()})
    row[f"{c.name}/num_examples"] = c.num_examples
  return row


def resolved_config_json(config, clients: Sequence[Client]) -> dict:
  """The config as JSON with fed.centers naming the clients in order."""
  config_json = json.loads(config.to_json_best_effort())
  config_json["fed"]["centers"] = ",".join(c.name for c in clients)
  return config_json


def train(config, workdir: str, clients: Sequence[Client], *,
          stop_after_rounds: int | None = None, overwrite: bool = False,
          progress: bool = True) -> dict:
  """Runs (or resumes) federated training of G1 in `workdir`.

  Every round runs all K clients (stacked or sequential, config.fed.engine)
  and saves a checkpoint: workdir/checkpoints/<rounds x tau> holds `state`
  {params, ema, opt_state (the K clients' stacked)} and `meta` {config,
  round, clients, num_examples}; the EMA and config are where
  Denoiser.load / launch.export_model read a central run's, so the global
  EMA exports the same way. A rerun resumes after the last saved round and
  ends with the parameters of an uninterrupted run. A preemption signal
  stops after the round in progress (saved).

  Args:
    config: the full config (fed, train, model, diffusion, mask, data).
    workdir: checkpoints/, metrics.jsonl (a row per round, step = rounds x
      tau, with per-client columns '<center>/loss', ...; with DP
      '<center>/dp_epsilon' and their max 'dp_epsilon'), tensorboard/,
      run.json.
    clients: the K clients in a fixed order (the order is the RNG's client
      index); launch.train_data.make_clients builds them.
    stop_after_rounds: stop after this many rounds (with a checkpoint), as
      if killed; for tests and staged runs. None runs config.fed.rounds.
    overwrite: delete another run's outputs in `workdir` instead of
      refusing it.
    progress: show a progress bar over rounds.

  Returns:
    dict: rounds (done), step, params, ema, opt_state, engine, compile_s,
    round_s (seconds of each round run here), metrics (last row),
    preempted, graphdef, rest.

  Raises:
    errors.ConfigError: a setting out of range (before any compile).
    errors.RunMismatch: `workdir` holds another run.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  config_checks.validate(config)
  _validate(config, clients)
  fed, t = config.fed, config.train
  tau = fed.local_steps
  accountants = None
  if diffusion.dp_enabled(config):
    clients = dp_clients(clients)
    accountants = dp_accountants(config, clients)
  config_json = resolved_config_json(config, clients)
  loop.claim_workdir(workdir, run_identity(config_json), identity_fn=run_identity,
                     what="a federated training run", overwrite=overwrite)
  graphdef, rest, params, ema = init_global(config)
  opt_states = stack([init_opt_state(config, params)] * len(clients))
  state = {"params": params, "ema": ema, "opt_state": opt_states}
  checkpointer = loop.make_checkpointer(workdir, t)
  writer = watcher = None
  round_s, last, preempted = [], {}, False
  try:
    step, state = loop.restore(checkpointer, state)
    done = step // tau
    engine, program, compile_s = compile_programs(
        config, graphdef, rest, state["params"], state["ema"],
        state["opt_state"], clients, fed.engine)
    logging.info("federated: %d clients (%s), %s engine, round %d of %d",
                 len(clients), ", ".join(c.name for c in clients), engine,
                 done, fed.rounds)
    writer = metrics_lib.MetricsWriter(workdir, enabled=parallel.is_main(),
                                       tensorboard=t.tensorboard, resume_step=step)
    watcher = ckpt_lib.PreemptionWatcher()
    end = fed.rounds if stop_after_rounds is None else min(stop_after_rounds, fed.rounds)
    bar = tqdm(total=end, initial=min(done, end), desc="rounds", unit="round",
               disable=not progress)
    try:
      for r in range(done, end):
        start = time.perf_counter()
        new, opt_states, client_metrics = run_round(
            engine, program, config, state["params"], state["ema"],
            state["opt_state"], clients, r)
        state = {"params": new["params"], "ema": new["ema"],
                 "opt_state": opt_states}
        jax.block_until_ready(state)
        round_s.append(time.perf_counter() - start)
        last = _round_row(r, clients, client_metrics, round_s[-1])
        if accountants is not None:
          _dp_epsilons(last, clients, accountants, (r + 1) * tau)
        writer.write((r + 1) * tau, last)
        checkpointer.save((r + 1) * tau, state, {
            "config": config_json, "round": r + 1, "next_step": (r + 1) * tau,
            "clients": [c.name for c in clients],
            "num_examples": [c.num_examples for c in clients]}, force=True)
        done = r + 1
        bar.update(1)
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
        if watcher.requested():
          preempted = True
          break
    finally:
      bar.close()
  finally:
    loop.close_all(checkpointer, writer, watcher)
  if preempted:
    logging.warning("stopped after round %d on a preemption signal; checkpoint "
                    "saved, rerun with the same --workdir to resume", done)
  return {"rounds": done, "step": done * tau, "params": state["params"],
          "ema": state["ema"], "opt_state": state["opt_state"], "engine": engine,
          "compile_s": compile_s, "round_s": round_s, "metrics": last,
          "preempted": preempted, "graphdef": graphdef, "rest": rest}
