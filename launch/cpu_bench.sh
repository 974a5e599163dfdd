#!/usr/bin/env bash
# The CPU sampler target of PERFORMANCE.md, side by side: this project's
# `benchmark.py:cpu` (small preset, 64 x 64, batch 4, 10 network calls, fp32)
# and the PyTorch peer's fp32 eager loop with the same settings, alternated
# ROUNDS times (these VMs are noisy: compare medians, not single runs).
#
# The peer needs torch + diffusers, which the project does not install:
#   python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch diffusers==0.42.1 \
#       --extra-index-url https://download.pytorch.org/whl/cpu
#   PEER_PYTHON=/tmp/peer/bin/python ROUNDS=3 bash launch/cpu_bench.sh
# Prints one JSON line per run ("benchmark": "sampler" = ours, "mode": "fp32" = peer).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PEER_PYTHON="${PEER_PYTHON:-}"
PEER_SCRIPT="${PEER_SCRIPT:-../shared/bench/diffusers_repaint_bench.py}"
for _ in $(seq "${ROUNDS:-3}"); do
  "$PY" -m launch.benchmark_sampler --config=configs/benchmark.py:cpu 2>/dev/null | grep '^{'
  if [ -n "$PEER_PYTHON" ]; then
    S=64 B=4 STEPS=10 R=1 JL=5 MODES=fp32 REPS=2 "$PEER_PYTHON" "$PEER_SCRIPT" 2>/dev/null \
      | grep '^{'
  fi
done
