r"""Train-step throughput on synthetic data (no TensorFlow needed).

  python -m launch.benchmark_train --config=configs/benchmark.py      # GPU
  python -m launch.benchmark_train --config=configs/benchmark.py:cpu  # CPU
  python -m launch.benchmark_train --config=configs/benchmark.py:cpu \
      --config.bench.model=seg                      # the segmenter's step

Prints one JSON line: images/s, step time, compile time, parameters, FLOPs
per image (3 x the analytic forward count; XLA's count beside it), the
achieved TFLOP/s and its share of the chip's peak, peak device memory. With
--config.bench.profile_dir=D, a second line breaks 3 steps' time down by
kind of work (dfgm_jax/profiling.py); D keeps the trace.

With --config.bench.model=seg, one line for the segmenter of config.seg
instead: images/s (total and per seed), step and compile times with its
seeds stacked in one program and with one seed at a time.
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
  for line in benchmark_common.train_benchmark(flags.FLAGS.config):
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
