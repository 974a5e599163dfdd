"""Shared wiring of the absl binaries: config flag, user errors, logging, distributed init.

Importing this module (every binary does, first) makes a user's error end the
binary with one line on stderr, `error: <message>`, and exit status 1, while
a bug keeps its traceback. User errors are `errors.UserError` (ConfigError,
RunMismatch, ModelError, ...), a permission or read-only-file-system error
(an output folder the user cannot write), a full disk, a `--config.<field>`
override that names no field of the config, and a flag absl cannot parse.
"""

from __future__ import annotations

import errno
import logging as logging_std
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import configs
from dfgm_jax import config_checks
from dfgm_jax import disk_full
from dfgm_jax import errors
from dfgm_jax import paths
from dfgm_jax import platform

# Before any binary starts a JAX backend (see dfgm_jax/platform.py).
platform.apply_xla_flags()

# Errors of the user's environment, not of the program: the path says where.
_USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _config_field_error(exc: BaseException) -> str | None:
  """One line for a `--config.a.b=v` that names no field, else None.

  ml_collections reports it as a KeyError / AttributeError with a "Did you
  mean" hint, raised while the overrides are resolved (config_path.py; at
  import when --config is not given, in app.run when it is). Only a field
  that an override on the command line names counts: a bug in a config file
  keeps its traceback.
  """
  if not isinstance(exc, (KeyError, AttributeError)):
    return None
  frames = traceback.extract_tb(exc.__traceback__)
  if not any(f.filename.endswith(os.path.join("config_flags", "config_path.py"))
             for f in frames):
    return None
  # AttributeError(KeyError("'batchsize'\\nDid you mean \"batch_size\" ...")).
  cause = exc
  while cause.args and isinstance(cause.args[0], BaseException):
    cause = cause.args[0]
  text = str(cause.args[0]) if cause.args else ""
  match = re.match(r"\s*'([^']+)'", text)
  if not match:
    return None
  field = match.group(1)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  overrides = [a.lstrip("-").split("=", 1)[0] for a in sys.argv[1:]
               if re.match(r"^--?config\.", a)]
  named = [o for o in overrides if field in o.split(".")[1:]]
  if not named:
    return None
  return (f"--{named[-1]}: the config has no field {field!r}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))


def user_error_message(exc: BaseException) -> str | None:
  """The one line a binary prints for an error that is the user's, else None."""
  full = disk_full.path_of(exc)
  if full is not None:  # whichever library met it (orbax, tfds, a write).
    return f"{full}: {disk_full.NO_SPACE}" if full else disk_full.NO_SPACE
  if isinstance(exc, errors.UserError):
    return " ".join(str(exc).split("\n"))  # one line, whatever it quotes.
  if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
  return _config_field_error(exc)


class _NoDiskFullTraceback(logging_std.Filter):
  """Drops the traceback from a log record about a full disk.

  orbax logs each failed background save thread with its traceback (and
  asyncio each of its write tasks) before the save's error reaches the
  binary, which then prints the one line. On absl's handler, which every
  logger's records reach.
  """

  def filter(self, record):
    if record.exc_info and disk_full.path_of(record.exc_info[1]) is not None:
      if record.name == "asyncio":
        return False  # "exception was never retrieved", once per array.
      record.exc_info, record.exc_text = None, None
    return True


logging.get_absl_handler().addFilter(_NoDiskFullTraceback())


def _excepthook(exc_type, exc, tb, previous=sys.excepthook):
  """Ends a user's error with one line; anything else keeps its traceback."""
  message = user_error_message(exc) if isinstance(exc, Exception) else None
  if message is None:
    previous(exc_type, exc, tb)
    return
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  if disk_full.path_of(exc) is not None:
    # A full disk leaves orbax's write coroutines pending; collected at
    # interpreter shutdown they print tracebacks after the line above. The
    # stack has unwound (files closed, the failed step in its temporary
    # folder), so the process ends here.
    logging.flush()
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


# Uncaught exceptions reach the hook after app.run re-raises them (and at
# import, where a bad override is parsed); Python then exits with status 1.
sys.excepthook = _excepthook


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a parse error ended like every other user error.

  absl's own parser (app.parse_flags_with_usage) prints `FATAL Flags parsing
  error` over two or more lines; here it is one line, `error: <why>`, with the
  same exit status 1.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    why = " ".join(str(e).split())
    sys.stderr.write(f"error: {why} (--helpshort lists the flags)\n")
    sys.stderr.flush()
    sys.exit(1)


# Every binary imports this module and calls app.run(main); run's default
# parser is bound when absl defines it, so it is replaced there, once, for
# all of them (a binary passing its own flags_parser keeps it).
app.run.__defaults__ = tuple(parse_flags if d is app.parse_flags_with_usage else d
                             for d in app.run.__defaults__)


def _validate_config() -> None:
  """After flag parsing, before main(): a bad value fails before any work."""
  if "config" not in flags.FLAGS:
    return
  try:
    config_checks.validate(flags.FLAGS.config)
  except OSError as e:
    # ml_collections defers a config file it cannot read to this first use,
    # with a several-line message whose last line says why.
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if re.match(r"^--?config=", a)]
    why = str(e).strip().splitlines()[-1].strip()
    raise errors.UserError(f"--config={given[-1] if given else '?'}: {why}") from None


def define_config_flag(default: str = "default.py") -> None:
  """`--config=configs/x.py[:arg]` plus `--config.a.b=value` overrides.

  The parsed config is checked by config_checks.validate before main() runs.
  """
  config_flags.DEFINE_config_file(
      "config", configs.path(default),
      "ml_collections config file (configs/*.py), optionally ':arg'.",
      lock_config=True)
  app.call_after_init(_validate_config)


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
