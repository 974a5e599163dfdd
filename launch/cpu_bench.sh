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
# SAMPLER_FLAGS="--config.x=y ..." passes extra flags to our benchmark only.
# Prints one JSON line per run ("benchmark": "sampler" = ours, "mode": "fp32" = peer), then a
# summary line with both medians and `ratio_of_medians` (ours / peer).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PEER_PYTHON="${PEER_PYTHON:-}"
PEER_SCRIPT="${PEER_SCRIPT:-../shared/bench/diffusers_repaint_bench.py}"
LINES="$(mktemp)"
trap 'rm -f "$LINES"' EXIT
for _ in $(seq "${ROUNDS:-3}"); do
  # shellcheck disable=SC2086  # SAMPLER_FLAGS: extra --config.x=y flags, word-split on purpose.
  "$PY" -m launch.benchmark_sampler --config=configs/benchmark.py:cpu ${SAMPLER_FLAGS:-} \
    2>/dev/null | grep '^{' \
    | tee -a "$LINES"
  if [ -n "$PEER_PYTHON" ]; then
    S=64 B=4 STEPS=10 R=1 JL=5 MODES=fp32 REPS=2 "$PEER_PYTHON" "$PEER_SCRIPT" 2>/dev/null \
      | grep '^{' | tee -a "$LINES"
  fi
done
# Last line: the medians of both and their ratio (the CPU target is >= 1).
"$PY" - "$LINES" <<'PYEOF'
import json, statistics, sys
ours, peer = [], []
for line in open(sys.argv[1]):
  d = json.loads(line)
  if "images_per_s" in d:
    (ours if d.get("benchmark") == "sampler" else peer).append(d["images_per_s"])
med = lambda v: statistics.median(v) if v else None
summary = {"summary": "cpu_sampler_vs_peer", "rounds": len(ours), "ours_images_per_s": ours,
           "peer_images_per_s": peer, "ours_median": med(ours), "peer_median": med(peer)}
if ours and peer:
  summary["ratio_of_medians"] = round(med(ours) / med(peer), 3)
print(json.dumps(summary))
PYEOF
