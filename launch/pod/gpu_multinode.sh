#!/usr/bin/env bash
# Train (STAGE=train, default) or synthesize (STAGE=synthesize) on several GPU
# nodes: one process per node (it drives all local GPUs).
#
# Under SLURM (sbatch with --ntasks-per-node=1) jax.distributed.initialize()
# reads the SLURM environment by itself; pass --jax_distributed. Without
# SLURM, give every node the coordinator explicitly:
#
#   node 0:  COORD=node0:1234 NPROC=2 PID=0 bash launch/pod/gpu_multinode.sh
#   node 1:  COORD=node0:1234 NPROC=2 PID=1 bash launch/pod/gpu_multinode.sh
#
# GPU hosts need no TensorFlow: use config.train.reader=grain (ArrayRecord
# copy, needs grain + tensorflow-datasets) or synthetic for benchmarking.
# Useful XLA settings (measure per jaxlib; see shared/docs/ECOSYSTEM.md 7):
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
#   XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
set -euo pipefail
DATA_DIR="${DATA_DIR:-/shared/slices}"
WORKDIR="${WORKDIR:-/shared/runs/g1}"
if [ -n "${SLURM_NTASKS:-}" ]; then
  dist=(--jax_distributed)
else
  dist=(--coordinator_address="${COORD:?host:port of node 0}"
        --num_processes="${NPROC:?number of nodes}" --process_id="${PID:?this node}")
fi
# Synthesis: batches are global over all GPUs; only process 0 writes, so
# WORKDIR must be on node 0's disk (or shared); MODEL_DIR is an export.
if [ "${STAGE:-train}" = synthesize ]; then
  exec .venv/bin/python -m launch.synthesize "${dist[@]}" \
    --config=configs/default.py --config.model.dtype=bfloat16 \
    --config.sampler.batch_size="${BATCH:-256}" \
    --model_dir="${MODEL_DIR:?exported model folder}" \
    --data_dir="$DATA_DIR" --workdir="$WORKDIR"
fi
exec .venv/bin/python -m launch.train_diffusion "${dist[@]}" \
  --config=configs/default.py --config.train.reader=grain \
  --config.model.dtype=bfloat16 --config.model.attention_impl=cudnn \
  --data_dir="$DATA_DIR" --workdir="$WORKDIR"
