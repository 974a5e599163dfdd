"""Throughput benchmarks (launch/benchmark_train.py, launch/benchmark_sampler.py).

Variants (--config=configs/benchmark.py[:variant]):
  (none), gpu   GPU/TPU: small preset, 128 x 128, batch 64, bfloat16;
                sampler: DDIM blend S=100, jl=5, r=2 = 195 NFE (PERFORMANCE.md);
                segmenter (bench.model=seg): paper scale, width 64, depth 4,
                3 seeds, batch 16
  cpu           this 2-core CPU: small preset at 64 x 64, batch 4, float32;
                sampler: 10 steps, no resampling; segmenter: the demo's
                (width 16, depth 3, 2 seeds, batch 16)
"""

import ml_collections

import configs
from configs import data
from configs import diffusion
from configs import segmentation

VARIANTS = {
    "": "GPU/TPU, small preset, 128 x 128, batch 64, bfloat16",
    "gpu": "the same as none",
    "cpu": "2-core CPU, small preset at 64 x 64, batch 4, float32",
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = configs.variant(arg, VARIANTS, "benchmark.py")
  config = ml_collections.ConfigDict()
  # Seed of the random weights and batches.
  config.seed = 0
  config.data = data.get_data_config()
  diffusion.add_diffusion_sections(config)
  # The peer's network size (PERFORMANCE.md).
  config.model.preset = "small"
  # Activations in bfloat16 on accelerators (parameters stay float32).
  config.model.dtype = "bfloat16"
  config.data.image_size = 128
  # Global batch of one timed training step.
  config.train.batch_size = 64
  # Random batches of the right shapes: times the step, not the disk.
  config.train.reader = "synthetic"
  config.train.warmup_steps = 10

  # What the benchmark binaries time.
  config.bench = ml_collections.ConfigDict()
  # Untimed calls after compiling.
  config.bench.warmup_steps = 3
  # Timed calls.
  config.bench.steps = 20
  # Peak dense TFLOP/s of the chip for `peak_fraction`; 0 = look the device
  # kind up in launch/benchmark_common.py (none for CPUs).
  config.bench.peak_tflops = 0.0
  # Timed sampler runs (best and mean reported).
  config.bench.reps = 2
  # Trained weights (EMA) instead of random ones: an export or a workdir.
  config.bench.checkpoint_dir = ""
  # Non-empty: trace one more call there and print where its time goes.
  config.bench.profile_dir = ""
  # Global batch of one timed sampler call.
  config.sampler.batch_size = 64
  # What launch.benchmark_train times: diffusion (the diffusion train step)
  # or seg (the segmenter's step, config.seg.seeds stacked against one at a
  # time).
  config.bench.model = "diffusion"
  # The segmenter of bench.model=seg (paper scale; the cpu variant: the demo's).
  config.seg = segmentation.get_seg_config()
  if variant == "cpu":
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
    # The demo's segmenter (configs/demo.py) on the same 64 x 64 slices.
    config.seg.width = 16
    config.seg.depth = 3
    config.seg.seeds = (0, 1)
  return config
