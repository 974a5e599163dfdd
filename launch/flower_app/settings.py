"""What the Flower ServerApp and ClientApp share: the run config, a site's
node config and the wire format of the global model.

Run config (`[tool.flwr.app.config]` in pyproject.toml; `flwr run . <fed>
-c 'key=value'` overrides it; the same values reach the server and every
site). Keys are kebab-case, as Flower's own, in the run and node config:
  config     the ml_collections config file, relative to the app's root
             (e.g. configs/demo.py) or absolute: the binaries' --config.
  rounds, local-steps, centers
             the common settings, typed: config.fed.rounds, .local_steps,
             .centers (0 or "": the config file's value). config.fed.centers
             must name the sites in order: the order is the RNG's client
             index.
  overrides  any other field: space-separated 'dotted.field=value' pairs,
             the binaries' --config.dotted.field=value flags (e.g.
             'train.batch_size=4'); one set here and by its typed key too is
             refused.
  workdir    the server's workdir (absolute): checkpoints/ (one per round,
             the global params and EMA, as the in-job engine's),
             metrics.jsonl, flower_run.json.
  round-timeout  seconds the server waits for the sites' replies of a round.
  site-wait  seconds the server waits for all sites to be connected before
             a round; then it stops, naming the centers that never came.

Node config (each SuperNode's --node-config; it stays at the site):
  center     the site's private center, one of config.fed.centers.
  data-dir   the site's preprocessing output (launch.preprocess --out_dir)
             holding <center>_train and the public healthy split.
  state-dir  where the site keeps its optimizer state between rounds (and,
             with DP, its seed and ledger), in run-<run key>/<center>/: a
             SuperNode starts a new ClientApp process for every message, and
             a resumed run (a new `flwr run`) finds it under the same key.
  cache-dir  JAX's persistent compilation cache (default state-dir/xla_cache):
             every round after the first loads the compiled program.
  dp-seed    with config.dp.enabled, optional: the site's secret seed of its
             DP randomness (Poisson sampling, noise, diffusion noise). Unset,
             the site draws one at its first round and keeps it in its
             state-dir; set it only to reproduce a run (whoever knows it can
             subtract the noise). config.seed is known to the server, so a DP
             site never uses it for its randomness.
The snake_case names of earlier versions (data_dir, ...) are refused with
the new name, so a site is never run with half its settings ignored.

Each train message's ConfigRecord carries 'server-round' (the run's round,
from 1; a resumed run's first is the one after its last checkpoint) and
RUN_KEY: the run key (server_app.run_key), stable across the `flwr run`s of
one run, unlike Flower's run id.

Wire format: one ArrayRecord whose keys are 'params/<leaf>' and 'ema/<leaf>'
(model_io.leaf_name, the export's names), float32.
"""

from __future__ import annotations

import dataclasses
import os
import shlex

import numpy as np

from dfgm_jax import errors
from dfgm_jax import platform
from launch.flower_app import logs

platform.apply_xla_flags()  # as the binaries: before the first computation.
logs.one_stream()  # both apps import this module first.

# The key of a reply's MetricRecord that FedAvg weights by (weighted_by_key):
# the site's private example count n_k.
COUNT_KEY = "num-examples"
ARRAYS_KEY = "arrays"  # FedAvg's arrayrecord_key.
SITE_KEY = "site"  # a reply's ConfigRecord: which center answered, which round.
# A train message's ConfigRecord: the key the site keeps the run's state
# under (server_app.run_key).
RUN_KEY = "run-key"
# A DP site's epsilon after the round (its MetricRecord): FedAvg's weighted
# mean of it means nothing; the server takes each site's and their max.
EPSILON_KEY = "dp_epsilon"
# The app's root (the repository, or the FAB a SuperLink/SuperNode unpacked):
# relative config paths are taken from here.
APP_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def load_config(run_config):
  """The run's ml_collections config from the run config, checked.

  Raises:
    errors.ConfigError: unreadable file, unknown field, a value out of
      range, or fed.centers not named.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from dfgm_jax import config_checks  # pylint: disable=g-import-not-at-top
  path = str(run_config.get("config", "configs/default.py"))
  if not os.path.isabs(path.split(":", 1)[0]):
    path = os.path.join(APP_ROOT, path)
  overrides = config_overrides(run_config)
  # A private flag set parses the file and overrides exactly as the
  # binaries' --config flags do (types, locked fields).
  argv = ["flower_app", f"--config={path}"] + [f"--config.{o}" for o in overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    config = values.config
    config.to_dict()  # a file that failed to load raises on first use.
  except (flags.Error, OSError, KeyError, AttributeError, TypeError,
          ValueError) as e:
    if isinstance(e, (KeyError, AttributeError)):  # an unknown field.
      why = f"the config has no field {str(e).strip(chr(34))}"
    else:
      why = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
    raise errors.ConfigError(f"run config config={run_config.get('config')!r} "
                             f"overrides={run_config.get('overrides', '')!r}: "
                             f"{why}") from None
  config_checks.validate(config)
  centers(config)
  return config


# The run config's typed keys: (key, the config field it sets, type).
TYPED_KEYS = (("rounds", "fed.rounds", int), ("local-steps", "fed.local_steps", int),
              ("centers", "fed.centers", str))


def config_overrides(run_config) -> list[str]:
  """The 'dotted.field=value' overrides of the run config: its `overrides`
  string, then its typed keys that are set (not 0 or "").

  Raises:
    errors.ConfigError: an override that is not 'field=value', a typed key
      of the wrong type, or a field set both ways.
  """
  overrides = shlex.split(str(run_config.get("overrides", "")))
  bad = [o for o in overrides if "=" not in o]
  if bad:
    raise errors.ConfigError(f"run config overrides: {bad[0]!r} is not "
                             "'dotted.field=value'")
  named = {o.split("=", 1)[0].strip() for o in overrides}
  for key, field, kind in TYPED_KEYS:
    value = run_config.get(key)
    if value in (None, "", 0):
      continue
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)
                        or value < 0):
      raise errors.ConfigError(f"run config {key}={value!r}: not a positive "
                               "integer")
    if field in named:
      raise errors.ConfigError(
          f"run config {key}={value!r} and overrides {field}=...: set "
          f"{field} once (the typed key {key})")
    overrides.append(f"{field}={value}")
  return overrides


def centers(config) -> list[str]:
  """config.fed.centers as a list; the Flower engine needs them named."""
  named = [c.strip() for c in config.fed.centers.split(",") if c.strip()]
  if not named:
    raise errors.ConfigError(
        "config.fed.centers='': the Flower engine needs its sites named in "
        "order (the order is the RNG's client index), e.g. run config "
        "overrides='fed.centers=CBICA,TCIA'")
  if len(set(named)) != len(named):
    raise errors.ConfigError(f"config.fed.centers={config.fed.centers}: a "
                             "center appears twice")
  return named


@dataclasses.dataclass(frozen=True)
class Site:
  """A SuperNode's own settings (its --node-config)."""

  center: str
  data_dir: str
  state_dir: str
  cache_dir: str
  dp_seed: int | None = None  # None: a secret seed drawn at the site.


NODE_KEYS = ("center", "data-dir", "state-dir", "cache-dir", "dp-seed")


def site(node_config) -> Site:
  """The site's settings from its node config; names a missing key and
  refuses an old snake_case name with its new one (other keys are Flower's
  or the operator's, not this app's)."""
  for key in node_config:
    if "_" in key and key.replace("_", "-") in NODE_KEYS:
      raise errors.ConfigError(f"--node-config {key}: renamed "
                               f"{key.replace('_', '-')} (the app's keys are "
                               "kebab-case, as Flower's)")

  def get(key, default=None):
    value = node_config.get(key, default)
    if value in (None, ""):
      raise errors.ConfigError(
          f"--node-config: {key} is missing; a SuperNode of this app needs "
          "center=\"<center>\" data-dir=\"<slices>\" state-dir=\"<dir>\"")
    return str(value)
  state_dir = os.path.abspath(get("state-dir"))
  dp_seed = node_config.get("dp-seed")
  if dp_seed not in (None, ""):
    try:
      dp_seed = int(dp_seed)
    except (TypeError, ValueError):
      raise errors.ConfigError(f"--node-config dp-seed={dp_seed!r}: not an "
                               "integer") from None
  else:
    dp_seed = None
  return Site(center=get("center"), data_dir=os.path.abspath(get("data-dir")),
              state_dir=state_dir,
              cache_dir=os.path.abspath(get("cache-dir", os.path.join(
                  state_dir, "xla_cache"))), dp_seed=dp_seed)


def use_compilation_cache(cache_dir: str) -> None:
  """JAX's persistent compilation cache in `cache_dir`, every program in it
  (each round's process would otherwise compile the client program again)."""
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# --- Wire format ---------------------------------------------------------------


def to_record(params, ema):
  """One ArrayRecord of the params and EMA: 'params/<leaf>', 'ema/<leaf>'."""
  from flwr.app import Array, ArrayRecord  # pylint: disable=g-import-not-at-top
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  record = ArrayRecord()
  for part, tree in (("params", params), ("ema", ema)):
    for name, value in model_io.flatten(tree).items():
      record[f"{part}/{name}"] = Array(value)
  return record


def from_record(record, template, source: str = "the ArrayRecord"):
  """(params, ema) in the structure of `template` (the network's params).

  Raises:
    model_io.ModelError: names missing or unexpected, or a shape that does
      not fit the network.
  """
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  arrays = {"params": {}, "ema": {}}
  for key in record.keys():
    part, _, name = key.partition("/")
    if part not in arrays:
      raise model_io.ModelError(f"{source}: unexpected array {key!r}")
    arrays[part][name] = record[key].numpy()
  return (model_io.fill(template, arrays["params"], f"{source} params"),
          model_io.fill(template, arrays["ema"], f"{source} ema"))


def list_to_record(arrays, template):
  """An ArrayRecord from arrays in to_record's order (SecAgg+'s legacy
  messages carry a list)."""
  from flwr.app import Array, ArrayRecord  # pylint: disable=g-import-not-at-top
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  names = list(model_io.flatten(template))
  keys = [f"{part}/{n}" for part in ("params", "ema") for n in names]
  if len(keys) != len(arrays):
    raise model_io.ModelError(f"the server's arrays: {len(arrays)} arrays, the "
                              f"network has {len(keys)}")
  return ArrayRecord({k: Array(np.asarray(v, np.float32))
                      for k, v in zip(keys, arrays)})
