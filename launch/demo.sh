#!/usr/bin/env bash
# The README's main command: set up, then run the whole pipeline on the
# built-in phantom data. Extra flags go to launch.run_pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m launch.run_pipeline --config=configs/demo.py \
  --workdir=runs/demo "$@"
