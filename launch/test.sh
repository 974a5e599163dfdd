#!/usr/bin/env bash
# The README's test command: set up, then run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m slow`. Tests run
# on TEST_WORKERS pytest-xdist workers (default 2; docs/benchmark_log.md has the measured time on the
# 2-core CPU); `-n 0` runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" tests "$@"
