#!/usr/bin/env bash
# One GPU benchmark job: blended sampler, train step and the PyTorch peer
# (PERFORMANCE.md), side by side on the same GPU.
#
# For a bare GPU host without internet: `bash launch/fetch_gpu_wheels.sh` where
# pip works (wheels of ml-collections, diffusers and importlib-metadata and the
# peer's script, into .whl/), then on the host
#   OUT=/tmp/out bash launch/gpu_bench.sh
# Each result is one JSON line in $OUT/<run>.json; the sampler and train runs
# add a profile line (where one call's time goes, dfgm_jax/profiling.py) and
# $OUT/*_ops.json, every instruction's time; the traces stay in $TRACES.
# train_seg times the evaluation's segmenter (seeds stacked vs one at a time).
#
# Environment: BENCH_FLAGS (extra --config.x=v for every run of ours, e.g. a
# tiny dry run on a CPU first), SKIP (run names to leave out), PY (python),
# PEER_SCRIPT (default .whl/diffusers_repaint_bench.py; absent = no peer run).
# Exits 1 when any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dfgm_gpu_bench}"
TRACES="${TRACES:-/tmp/dfgm_gpu_traces}"
PY="${PY:-python3}"
PEER_SCRIPT="${PEER_SCRIPT:-.whl/diffusers_repaint_bench.py}"
read -r -a EXTRA <<< "${BENCH_FLAGS:-}"
mkdir -p "$OUT" "$TRACES"
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
FAILED=0
run() {  # name, command...
  local name=$1; shift
  case " ${SKIP:-} " in *" $name "*) echo "skip $name"; return;; esac
  local start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc ${name} $(( $(date +%s) - start ))s"
  [ "$rc" = 0 ] || FAILED=1
  grep '^{' "$OUT/$name.log" | tail -n 3 | tee "$OUT/$name.json"
}
ours() {  # name, binary, flags...
  local name=$1 binary=$2; shift 2
  run "$name" "$PY" -m "launch.$binary" --config=configs/benchmark.py "${EXTRA[@]}" "$@"
}
# Most important first: if the job is cut short, the headline pair is in.
ours sampler_xla benchmark_sampler --config.bench.profile_dir="$TRACES/sampler"
if [ -f "$PEER_SCRIPT" ]; then
  run peer env S=128 B=64 MODES=bf16_compile REPS=2 "$PY" "$PEER_SCRIPT"
fi
# A/B: the GroupNorm form tuned for XLA:CPU (norm_impl=auto picks 'groups' on GPUs).
ours sampler_gn_channels benchmark_sampler --config.model.overrides.norm_impl=channels
# No RePaint jumps, so no lax.cond around the network: if its NFE x images/s
# is well above sampler_xla's, the branch costs on this GPU.
ours sampler_nojump benchmark_sampler --config.sampler.resamples=1
ours train benchmark_train --config.bench.profile_dir="$TRACES/train"
cp "$TRACES"/*/*_ops.json "$OUT"/ 2>/dev/null
# The evaluation's segmenter at paper scale (width 64, depth 4, 3 seeds):
# seeds stacked in one vmapped program against one at a time.
ours train_seg benchmark_train --config.bench.model=seg
ours sampler_cudnn benchmark_sampler --config.model.attention_impl=cudnn
exit "$FAILED"
