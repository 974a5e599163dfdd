r"""Diffusion train-step throughput on synthetic data (no TensorFlow needed).

  python -m launch.benchmark_train --config=configs/benchmark.py      # GPU
  python -m launch.benchmark_train --config=configs/benchmark.py:cpu  # CPU

Prints one JSON line: images/s, step time, compile time, parameters, FLOPs
per image (3 x the analytic forward count; XLA's count beside it), the
achieved TFLOP/s and its share of the chip's peak, peak device memory. With
--config.bench.profile_dir=D, a second line breaks 3 steps' time down by
kind of work (dfgm_jax/profiling.py); D keeps the trace.
"""

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from dfgm_jax import parallel
from dfgm_jax.models import flops as model_flops
from dfgm_jax.diffusion import denoiser
from dfgm_jax.train import diffusion
from dfgm_jax.train import loop
from launch import benchmark_common
from launch import common
from launch import train_data

common.quiet_tensorflow()
common.define_config_flag("benchmark.py")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  mesh = parallel.make_mesh()
  sampler = train_data.make_sampler(config, None)
  graphdef, rest, state = diffusion.init_state(config)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  state = jax.device_put(state, parallel.replicated(mesh))
  batch = loop.global_batches(loop.stack_batches(sampler.batch, 0, 1), mesh)
  compiled, compile_s = loop.compile_step(
      diffusion.make_train_step(graphdef, rest, config), state, batch, mesh)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step_flops = float((cost or {}).get("flops", 0.0))
  b = config.train.batch_size
  for _ in range(config.bench.warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(config.bench.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start
  step_s = elapsed / config.bench.steps
  mcfg = denoiser.model_config(config)
  # Training FLOPs = 3 x forward (the backward pass costs about twice the
  # forward), counted analytically like the peer's 31.1 GFLOP. XLA's own count
  # is reported too, but on GPU it misses the cuDNN convolution custom calls.
  forward = model_flops.flops_per_image(mcfg, image_size=config.data.image_size)
  train_flops = 3.0 * forward
  tflops = train_flops * b / step_s / 1e12
  peak = benchmark_common.peak_tflops(config.bench.peak_tflops)
  per_device_peak = peak * jax.device_count() if peak else None
  print(json.dumps({
      "benchmark": "train",
      "device": benchmark_common.device_description(),
      **benchmark_common.software(),
      "preset": config.model.preset,
      "image_size": config.data.image_size,
      "batch_size": b,
      "dtype": config.model.dtype,
      "params": params,
      "images_per_s": round(b / step_s, 2),
      "step_time_s": round(step_s, 4),
      "compile_s": round(compile_s, 2),
      "train_flops_per_image": train_flops,
      "forward_flops_per_image": forward,
      "train_flops_per_image_xla": step_flops / b if step_flops else None,
      "tflops": round(tflops, 2) if tflops else None,
      "peak_tflops": per_device_peak,
      "peak_fraction": round(tflops / per_device_peak, 4) if tflops and per_device_peak else None,
      "peak_memory_bytes": benchmark_common.peak_memory_bytes(),
      "devices": jax.device_count(),
      "final_loss": float(metrics["loss"]),
  }))
  if config.bench.profile_dir:
    def one_step():
      nonlocal state
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
    print(json.dumps(benchmark_common.profile(
        "train", compiled, one_step, config.bench.profile_dir, calls=3)))


if __name__ == "__main__":
  app.run(main)
