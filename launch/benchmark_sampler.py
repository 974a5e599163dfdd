r"""Blended-sampler throughput: the product's headline figure.

  python -m launch.benchmark_sampler --config=configs/benchmark.py      # GPU
  python -m launch.benchmark_sampler --config=configs/benchmark.py:cpu  # CPU
      [--config.sampler.steps=100 --config.sampler.resamples=2 ...]

Random weights (or the EMA weights of config.bench.checkpoint_dir: an export
or a training workdir), synthetic
inputs; needs no TensorFlow, tfds or nibabel, so it runs on bare GPU hosts.
The whole sampler is one compiled program, data-parallel over all devices.
Prints one JSON line (keys in PERFORMANCE.md's vocabulary); with
--config.bench.profile_dir=D, a second line says where one sampler call's
time goes (dfgm_jax/profiling.py) and D keeps the trace.
"""

import json
import os
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import input_pipeline
from dfgm_jax import model_io
from dfgm_jax import parallel
from dfgm_jax.diffusion import sampler as sampler_lib
from dfgm_jax.models import flops as model_flops
from dfgm_jax.synthesis import masks
from dfgm_jax.diffusion import denoiser
from dfgm_jax.train import diffusion
from launch import benchmark_common
from launch import common

common.quiet_tensorflow()
common.define_config_flag("benchmark.py")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  mesh = parallel.make_mesh()
  weights = "random"
  if config.bench.checkpoint_dir:
    # An export or a training workdir (or its checkpoints/): trained EMA weights;
    # the model's own config defines the network (and the image size).
    model_dir = os.path.normpath(config.bench.checkpoint_dir)
    if os.path.basename(model_dir) == "checkpoints":
      model_dir = os.path.dirname(model_dir)
    config, graphdef, rest, params, step = model_io.load_for_sampling(model_dir, config, mesh)
    weights = f"ema@{step}"
  else:
    graphdef, rest, state = diffusion.init_state(config)
    params = state["params"]
  s = config.sampler
  size = config.data.image_size
  b = s.batch_size
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  params = jax.device_put(params, parallel.replicated(mesh))

  examples = [input_pipeline.synthetic_example(i, size, len(config.data.modalities))
              for i in range(b)]
  tumor = jnp.asarray(np.stack([e["mask"] for e in examples]), jnp.float32)
  ring = masks.ring(tumor, masks.radius_for_size(config.mask.r_out_240, size))
  data = parallel.data_sharding(mesh)
  inputs = [jax.device_put(x, data) for x in (
      np.stack([e["image"] for e in examples]), np.asarray(ring),
      np.asarray(tumor), np.arange(b, dtype=np.int32))]
  sched = denoiser.schedule_from(config)
  scfg = denoiser.sampler_config_from(config)
  plan = sampler_lib.make_plan(scfg, sched.num_steps)

  def sample(params, y, ring, tumor, index):
    def eps_fn(x, t, c, r, m):
      return nnx.merge(graphdef, params, rest)(x, t, c, r, m)
    return sampler_lib.blend_sample(eps_fn, sched, scfg, y, ring, tumor,
                                    jax.random.key(config.seed), index)

  jitted = jax.jit(sample, in_shardings=(parallel.replicated(mesh),) + (data,) * 4,
                   out_shardings=data)
  start = time.perf_counter()
  compiled = jitted.lower(params, *inputs).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, *inputs))  # warm-up
  times = []
  for _ in range(config.bench.reps):
    start = time.perf_counter()
    out = compiled(params, *inputs)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  best = min(times)
  mcfg = denoiser.model_config(config)
  flops = model_flops.flops_per_image(mcfg, image_size=size)
  tflops = plan.nfe * b * flops / best / 1e12
  peak = benchmark_common.peak_tflops(config.bench.peak_tflops)
  peak = peak * jax.device_count() if peak else None
  print(json.dumps({
      "benchmark": "sampler",
      "device": benchmark_common.device_description(),
      **benchmark_common.software(),
      "preset": config.model.preset,
      "image_size": size,
      "batch_size": b,
      "sampler": s.kind,
      "steps": s.steps,
      "jump_length": s.jump_length,
      "resamples": s.resamples,
      "dtype": config.model.dtype,
      "weights": weights,
      "params": num_params,
      "nfe_per_image": plan.nfe,
      "images_per_s": round(b / best, 3),
      "images_per_s_mean": round(b * len(times) / sum(times), 3),
      "nfe_images_per_s": round(plan.nfe * b / best, 1),
      "forward_gflops_per_image": round(flops / 1e9, 3),
      "tflops": round(tflops, 3),
      "peak_fraction": round(tflops / peak, 4) if peak else None,
      "compile_s": round(compile_s, 2),
      "peak_memory_bytes": benchmark_common.peak_memory_bytes(),
      "devices": jax.device_count(),
      "finite": bool(np.isfinite(np.asarray(out)).all()),
  }))
  if config.bench.profile_dir:
    print(json.dumps(benchmark_common.profile(
        "sampler", compiled,
        lambda: jax.block_until_ready(compiled(params, *inputs)),
        config.bench.profile_dir)))


if __name__ == "__main__":
  app.run(main)
