"""Shared wiring of the absl binaries: config flag, logging, distributed init."""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import configs
from dfgm_jax import paths
from dfgm_jax import platform

# Before any binary starts a JAX backend (see dfgm_jax/platform.py).
platform.apply_xla_flags()


def define_config_flag(default: str = "default.py") -> None:
  """`--config=configs/x.py[:arg]` plus `--config.a.b=value` overrides."""
  config_flags.DEFINE_config_file(
      "config", configs.path(default),
      "ml_collections config file (configs/*.py), optionally ':arg'.",
      lock_config=True)


def quiet_tensorflow() -> None:
  """TF logs and oneDNN notices drown absl's; set before TF is imported."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def print_artifacts(title: str, paths: dict) -> None:
  """Every binary ends by saying where its artifacts are."""
  logging.info("%s", title)
  print(title)
  for name, path in paths.items():
    print(f"  {name}: {path}")




def define_distributed_flags() -> None:
  """--jax_distributed and the explicit coordinator flags (multi-host binaries)."""
  flags.DEFINE_bool("jax_distributed", None, "Call jax.distributed.initialize(); "
                    "default: when a launcher environment is detected.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (local multi-process).")
  flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
  flags.DEFINE_integer("process_id", None, "With --coordinator_address.")


def initialize_distributed() -> bool:
  """jax.distributed.initialize() per the flags above; before any JAX call."""
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return parallel.maybe_initialize_distributed(
      f.jax_distributed, f.coordinator_address, f.num_processes, f.process_id)


def require_local(**flag_values) -> None:
  """Refuses bucket URLs for the flags of a binary that uses local file calls."""
  for flag, value in flag_values.items():
    try:
      paths.require_local(value, flag)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
