"""Throughput benchmarks (launch/benchmark_train.py, launch/benchmark_sampler.py).

  --config=configs/benchmark.py        GPU/TPU: small preset, 128 x 128,
                                       batch 64, bfloat16; sampler: DDIM blend
                                       S=100, jl=5, r=2 = 195 NFE (PERFORMANCE.md)
  --config=configs/benchmark.py:cpu    this 2-core CPU: small preset at 64 x 64,
                                       batch 4, float32; sampler: 10 steps, no
                                       resampling
"""

import ml_collections

from configs import data
from configs import diffusion


def get_config(arg=None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data.get_data_config()
  diffusion.add_diffusion_sections(config)
  config.model.preset = "small"
  config.model.dtype = "bfloat16"
  config.data.image_size = 128
  config.train.batch_size = 64
  config.train.reader = "synthetic"
  config.train.warmup_steps = 10
  config.bench = ml_collections.ConfigDict()
  config.bench.warmup_steps = 3  # untimed calls after compiling.
  config.bench.steps = 20  # timed calls.
  # Peak dense TFLOP/s of the chip for `peak_fraction`; 0 = look the device
  # kind up in launch/benchmark_common.py (none for CPUs).
  config.bench.peak_tflops = 0.0
  config.bench.reps = 2  # timed sampler runs (best and mean reported).
  config.bench.checkpoint_dir = ""  # trained weights (EMA) instead of random.
  # Non-empty: trace one more call there and print where its time goes.
  config.bench.profile_dir = ""
  config.sampler.batch_size = 64
  if arg == "cpu":
    config.sampler.batch_size = 4
    config.sampler.steps = 10
    config.sampler.resamples = 1
    config.model.dtype = "float32"
    config.data.image_size = 64
    # The network keeps the 128 x 128 layout (attention at 16 and 8 px levels
    # of a 128 input), i.e. the peer's structure, fed 64 x 64 images.
    config.model.overrides.image_size = 128
    config.train.batch_size = 4
    config.bench.warmup_steps = 1
    config.bench.steps = 3
  elif arg not in (None, "", "gpu"):
    raise ValueError(f"unknown benchmark variant {arg!r}; use cpu or gpu")
  return config
