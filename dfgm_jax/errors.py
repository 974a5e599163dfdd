"""Errors that are the user's, not the program's (JAX-free; the data layer uses it too).

A binary ends a `UserError` with one line on stderr and exit status 1 (see
launch/common.py); any other exception is a bug and keeps its traceback.
Subclasses say what kind of input was wrong; every message names the file,
field or flag and what is wrong with it.
"""


class UserError(Exception):
  """Bad input or settings: a file, a folder, a config value, a flag."""


class ConfigError(UserError, ValueError):
  """A config value outside its allowed range: 'config.a.b=v: must be ...'."""


class RunMismatch(UserError):
  """A finished (or started) output of another run, met with a different config."""
