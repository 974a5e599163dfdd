"""ml_collections configs: `get_config(arg=None)`; pass `--config=configs/x.py[:arg]`."""

import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """Absolute path of a config file shipped here, e.g. path('default.py')."""
  return os.path.join(CONFIG_DIR, name)
