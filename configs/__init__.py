"""ml_collections configs: `get_config(arg=None)`; pass `--config=configs/x.py[:arg]`.

Each file documents its variants (the `:arg` after the file name) in its
module docstring; an unknown variant is refused by `variant()` with the list
of valid ones, so a typo never silently runs the default.
"""

import os

from dfgm_jax import errors

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """Absolute path of a config file shipped here, e.g. path('default.py')."""
  return os.path.join(CONFIG_DIR, name)


class UnknownVariant(errors.UserError):
  """`--config=configs/x.py:<arg>` with an arg the file does not define.

  Not a ConfigError: ml_collections re-raises a config file's ValueError with
  its traceback in the text (and absl prints that), while any other error
  reaches launch/common.py's one-line report as it is.
  """


def variant(arg, variants: dict[str, str], config_file: str) -> str:
  """The variant `arg` of configs/<config_file>, '' for none.

  Args:
    arg: what followed ':' in --config=configs/<config_file>:<arg> (None or ''
      when nothing did).
    variants: every valid variant ('' = none) -> a few words on what it is.
    config_file: the config's file name, for the message.

  Raises:
    UnknownVariant (an errors.UserError): `arg` is not a key of `variants`; the message lists them.
  """
  name = arg or ""
  if name not in variants:
    valid = ", ".join(f"{config_file}{':' + k if k else ''} ({v})"
                      for k, v in variants.items())
    raise UnknownVariant(
        f"--config=configs/{config_file}:{name}: unknown variant; valid: {valid}")
  return name
