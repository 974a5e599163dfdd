r"""Blended-sampler throughput: the product's headline figure.

  python -m launch.benchmark_sampler --config=configs/benchmark.py      # GPU
  python -m launch.benchmark_sampler --config=configs/benchmark.py:cpu  # CPU
      [--config.sampler.steps=100 --config.sampler.resamples=2 ...]

Times the program synthesis runs (Denoiser.sampler: modes.synthesize_batch
in config.synthesis.mode, one compiled program, data-parallel over all
devices) with random weights, or the EMA weights of
config.bench.checkpoint_dir (an export or a training workdir), on synthetic
inputs; needs no TensorFlow, tfds or nibabel, so it runs on bare GPU hosts.
Prints one JSON line (keys in PERFORMANCE.md's vocabulary); with
--config.bench.profile_dir=D, a second line says where one sampler call's
time goes (dfgm_jax/profiling.py) and D keeps the trace.
"""

import json

from absl import app
from absl import flags

from launch import benchmark_common
from launch import common

common.quiet_tensorflow()
common.define_config_flag("benchmark.py")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for line in benchmark_common.sampler_benchmark(flags.FLAGS.config):
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
