#!/usr/bin/env bash
# One GPU benchmark job: train step, blended sampler (XLA and cuDNN attention)
# and the PyTorch peer (PERFORMANCE.md), side by side on the same GPU.
#
# For a bare GPU host without internet: put the wheels of ml-collections,
# diffusers and importlib-metadata (cp312, py3-none-any) and a copy of
# shared/bench/diffusers_repaint_bench.py in .whl/, then
#   OUT=/tmp/out bash launch/gpu_bench.sh
# Each result is one JSON line in $OUT/*.json; the sampler and train runs add
# a profile line (where one call's time goes, dfgm_jax/profiling.py) and
# $OUT/*_ops.json, every instruction's time; the traces stay in $TRACES.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/dfgm_gpu_bench}"
TRACES="${TRACES:-/tmp/dfgm_gpu_traces}"
mkdir -p "$OUT" "$TRACES"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
run() {  # name, command...
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? ${name} $(( $(date +%s) - start ))s"
  grep '^{' "$OUT/$name.log" | tail -n 3 | tee "$OUT/$name.json"
}
# Most important first: if the job is cut short, the headline pair is in.
run sampler_xla python3 -m launch.benchmark_sampler --config=configs/benchmark.py \
  --config.bench.profile_dir="$TRACES/sampler"
if [ -f .whl/diffusers_repaint_bench.py ]; then
  run peer env S=128 B=64 MODES=bf16_compile REPS=2 python3 .whl/diffusers_repaint_bench.py
fi
# A/B: the GroupNorm form tuned for XLA:CPU (norm_impl=auto picks 'groups' here).
run sampler_gn_channels python3 -m launch.benchmark_sampler --config=configs/benchmark.py \
  --config.model.overrides.norm_impl=channels
# No RePaint jumps, so no lax.cond around the network: if its NFE x images/s
# is well above sampler_xla's, the branch costs on this GPU.
run sampler_nojump python3 -m launch.benchmark_sampler --config=configs/benchmark.py \
  --config.sampler.resamples=1
run train python3 -m launch.benchmark_train --config=configs/benchmark.py \
  --config.bench.profile_dir="$TRACES/train"
cp "$TRACES"/*/*_ops.json "$OUT"/ 2>/dev/null
run sampler_cudnn python3 -m launch.benchmark_sampler --config=configs/benchmark.py \
  --config.model.attention_impl=cudnn
