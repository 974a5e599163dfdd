#!/usr/bin/env bash
# Fills .whl/ with what a bare GPU host needs for launch/gpu_bench.sh and
# cannot download itself: pure-Python wheels of ml-collections (our configs),
# diffusers and importlib-metadata (the peer), for the host's Python 3.12,
# plus the peer's script from ../shared/bench. Run it where pip works;
# .whl/ is git-ignored and travels with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
  ml-collections==1.1.0 diffusers==0.42.1 importlib-metadata
install -m 644 ../shared/bench/diffusers_repaint_bench.py .whl/
ls -l .whl
