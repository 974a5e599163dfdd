"""The Flower app's log lines: each once, where the operator looks, with the
run's own round numbers.

Flower streams what the ServerApp process writes (`flwr run --stream`,
`flwr log`), and a SuperNode's log holds what its ClientApp processes write.
Both processes import absl (through JAX and orbax), and absl's first log
call before its flags are parsed calls logging.basicConfig(): the root
logger gets a stream handler, and every record of Flower's logger, which
has its own console handler and propagates, was then printed twice.
one_stream() stops that propagation; say() writes through Flower's logger,
which both processes show (absl's INFO lines are dropped before its flags
are parsed, so the app's own lines never used it).
"""

from __future__ import annotations

import contextlib
import logging
from logging import ERROR, INFO

FLOWER_LOGGER = "flwr"


def one_stream() -> None:
  """Flower's records go to its own console handler only (not the root's
  too). Idempotent."""
  logging.getLogger(FLOWER_LOGGER).propagate = False


def say(message: str, *args, level: int = INFO) -> None:
  """One line in Flower's log: the server's stream, or the SuperNode's log."""
  from flwr.common import log  # pylint: disable=g-import-not-at-top
  log(level, message, *args)


def error(message: str) -> None:
  """The run's failure as one `error: ...` line (launch.flower_run looks for
  it in the run's log)."""
  say("error: %s", " ".join(str(message).split()), level=ERROR)


class RunRounds(logging.Filter):
  """Rewrites Flower's round banner to the run's numbering.

  Flower counts the rounds of one `flwr run` from 1 ('[ROUND 1/1]', or the
  legacy workflow's '[ROUND 1]'); a resumed run's first is the one after its
  last checkpoint: round `offset + 1` of `total`.
  """

  def __init__(self, offset: int, total: int):
    super().__init__()
    self.offset = offset
    self.total = total

  def filter(self, record: logging.LogRecord) -> bool:
    if record.msg in ("[ROUND %s/%s]", "[ROUND %s]") and record.args:
      record.msg = "[ROUND %s/%s]"
      record.args = (int(record.args[0]) + self.offset, self.total)
    return True


@contextlib.contextmanager
def run_rounds(offset: int, total: int):
  """Within it, Flower's round banners say the run's round (RunRounds)."""
  logger = logging.getLogger(FLOWER_LOGGER)
  rounds = RunRounds(offset, total)
  logger.addFilter(rounds)
  try:
    yield rounds
  finally:
    logger.removeFilter(rounds)
