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
in state_dir/run-<run id>/<center>/opt_state_<r>.npz (the previous round's
file is kept too, so a message delivered twice finds its input), and the
compiled program in JAX's persistent compilation cache (cache_dir).
"""

from __future__ import annotations

import glob
import io
import os
import re
import time

from absl import logging
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dfgm_jax import errors
from launch.flower_app import settings

app = ClientApp()


# --- The site's optimizer state between rounds ------------------------------------


def _state_dir(site: settings.Site, run_id: int) -> str:
  return os.path.join(site.state_dir, f"run-{run_id}", site.center)


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
      state_dir changed within the run) or one that does not fit.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = _state_path(directory, rounds_done)
  if not os.path.exists(path):
    raise errors.UserError(
        f"{path}: no optimizer state of round {rounds_done}; this site must "
        "train every round of a run with the same state_dir")
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


# --- The round --------------------------------------------------------------------


def run_round(config, site: settings.Site, run_id: int, arrays,
              round_index: int) -> tuple:
  """One round at this site: (update, client index, seconds by phase).

  Args:
    config: the run's config (settings.load_config).
    site: the site's node config.
    run_id: the Flower run (keys the optimizer state).
    arrays: the global params and EMA (an ArrayRecord).
    round_index: the round, from 0.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import federated  # pylint: disable=g-import-not-at-top
  from launch import train_data  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  centers = settings.centers(config)
  if site.center not in centers:
    raise errors.ConfigError(
        f"--node-config center={site.center!r}: not one of the run's "
        f"config.fed.centers={','.join(centers)}")
  index = centers.index(site.center)
  if config.train.reader != "synthetic" and not os.path.isdir(site.data_dir):
    raise errors.UserError(f"--node-config data_dir={site.data_dir}: no such "
                           "folder")
  client = train_data.make_client(config, site.data_dir, site.center, index)
  graphdef, rest, params, _ = federated.init_global(config)
  params, ema = settings.from_record(arrays, params, "the server's arrays")
  directory = _state_dir(site, run_id)
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
  return update, index, {"setup_s": ready - start, "train_s": trained - ready}


def _process_age() -> float | None:
  """Seconds since this process started (None where psutil is missing)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return time.time() - psutil.Process().create_time()
  except Exception:  # pylint: disable=broad-except  (a timing only)
    return None


@app.train()
def train(msg: Message, context: Context) -> Message:
  """FedAvg's train message -> this site's params, EMA and private count."""
  started = _process_age()  # the process's start and imports, before this.
  site = settings.site(context.node_config)
  settings.use_compilation_cache(site.cache_dir)
  config = settings.load_config(context.run_config)
  round_index = int(msg.content["config"]["server-round"]) - 1
  update, index, seconds = run_round(config, site, context.run_id,
                                     msg.content[settings.ARRAYS_KEY], round_index)
  logging.info("site %s round %d: %d private slices, loss %.4f, setup %.1fs, "
               "train %.1fs", site.center, round_index + 1, update.num_examples,
               update.metrics["loss"], seconds["setup_s"], seconds["train_s"])
  if started is not None:
    seconds["start_s"] = started
  metrics = {settings.COUNT_KEY: update.num_examples,
             **{k: float(update.metrics[k]) for k in ("loss", "grad_norm")
                if k in update.metrics}}
  return Message(content=RecordDict({
      settings.ARRAYS_KEY: settings.to_record(update.params, update.ema),
      "metrics": MetricRecord(metrics),
      settings.SITE_KEY: ConfigRecord({
          "center": site.center, "client-index": index,
          "round": round_index + 1, **seconds}),
  }), reply_to=msg)
