#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command runs on every host.
#
# JAX finds the other hosts of a TPU pod slice by itself (TPU_WORKER_HOSTNAMES
# etc. are set by the TPU runtime), so --jax_distributed only has to be on.
# The preprocessed slices must be readable by every host: a GCS bucket
# (tfds reads gs:// paths) or a copy on each host's disk. Each process reads
# its own shard of the healthy split; the batch is global over all chips.
#
#   TPU=my-v5e-32 ZONE=us-west4-a BUCKET=gs://my-bucket bash launch/pod/tpu_vm_pod.sh
#
# --data_dir and --workdir may be gs:// URLs (dfgm_jax/paths.py): checkpoints,
# metrics.jsonl and TensorBoard events land in the bucket.
# Synthesis runs the same way (launch.synthesize --jax_distributed ...), with
# --model_dir an export (a gs:// URL works) and --workdir a local or mounted
# (gcsfuse) path:
# only process 0 writes there, with plain file calls (a URL is refused).
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?zone}" "${BUCKET:?gs:// bucket}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/dfgm-jax || git clone https://github.com/YOUR_ORG/dfgm-jax ~/dfgm-jax && cd ~/dfgm-jax
  python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/python -m launch.train_diffusion --jax_distributed \
      --config=configs/default.py --config.train.reader=tf \
      --config.train.batch_size=256 --config.model.dtype=bfloat16 \
      --data_dir=$BUCKET/slices --workdir=$BUCKET/runs/g1
"
