"""Shared wiring of the absl binaries: config flag, logging, distributed init."""

from __future__ import annotations

import os

from absl import logging
from ml_collections import config_flags

import configs


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


