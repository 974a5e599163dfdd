"""The benchmarks' runs and the device facts they share.

sampler_benchmark and train_benchmark (diffusion or segmenter step) are what
launch/benchmark_sampler.py and launch/benchmark_train.py print; the rest is
peak FLOP/s, memory, device description and profiling they share.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax

from dfgm_jax import profiling

# Dense bf16 peak TFLOP/s by device kind (vendor figures). PERFORMANCE.md
# measured about 800 on an H100 with matmuls; pass --config.bench.peak_tflops
# to use a measured figure instead.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100": 989.4,
    "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


def peak_tflops(override: float = 0.0) -> float | None:
  """Peak TFLOP/s of one local device (None when unknown, e.g. CPUs)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, value in PEAK_TFLOPS.items():
    if kind.startswith(name):
      return value
  return None


def peak_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def device_description() -> str:
  d = jax.devices()[0]
  return f"{jax.device_count()} x {d.device_kind} ({d.platform})"


def software() -> dict:
  """Versions and XLA flags in effect: what a figure depends on besides the chip."""
  return {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def profile(name: str, compiled, run: Callable[[], None], profile_dir: str,
            calls: int = 1) -> dict:
  """Traces `calls` calls of `run()` and breaks the compiled program's time down.

  The trace stays in `profile_dir` (open it in Perfetto or XProf);
  `profile_dir/<name>_ops.json` holds every instruction's row. Returns the
  summary line (categories and the slowest instructions, per call).
  """
  line = {"benchmark": f"{name}_profile", "device": device_description(),
          **software(), "calls": calls, "trace_dir": profile_dir}
  try:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(calls):
        run()
    report = profiling.op_breakdown(profiling.load_trace_events(profile_dir),
                                    compiled.as_text(), calls=calls)
  except Exception as e:  # pylint: disable=broad-except
    # The throughput line is already out; a profiler that cannot run here
    # (no CUPTI, another trace active, an unknown trace layout) must not
    # turn the run into a failure.
    return {**line, "error": f"{type(e).__name__}: {e}"}
  if jax.default_backend() != "cpu" and not report["source"].startswith("device"):
    line["warning"] = ("no device events in the trace (CUPTI missing?): these are "
                       "host-side launch times, not kernel times")
  table = os.path.join(profile_dir, f"{name}_ops.json")
  with open(table + ".tmp", "w") as f:
    json.dump(report.pop("all_ops"), f, indent=0)
  os.replace(table + ".tmp", table)
  return {**line, "ops_table": table, **report}


def model_dir_of(checkpoint_dir: str) -> str:
  """The model folder for an export, a workdir or a workdir's checkpoints/.

  String operations only: os.path.normpath would turn gs://b into gs:/b.
  """
  model_dir = checkpoint_dir.rstrip("/")
  if model_dir.endswith("/checkpoints") or model_dir == "checkpoints":
    model_dir = model_dir[:-len("checkpoints")].rstrip("/") or "."
  return model_dir


def sampler_benchmark(config) -> list[dict]:
  """Times the path synthesis runs: Denoiser.sampler -> modes.synthesize_batch.

  Random weights, or the EMA weights of config.bench.checkpoint_dir (an export
  or a training workdir, whose own config then defines the network and the
  image size); seeded synthetic tumor slices pasted into synthetic healthy
  ones, in config.synthesis.mode (dfgm by default). Returns the throughput
  line (keys in PERFORMANCE.md's vocabulary) and, with
  config.bench.profile_dir, the profile line.
  """
  # pylint: disable=g-import-not-at-top
  import time

  import numpy as np

  from data_pipeline import input_pipeline
  from dfgm_jax import parallel
  from dfgm_jax.diffusion import denoiser
  from dfgm_jax.diffusion import sampler as sampler_lib
  from dfgm_jax.models import flops as model_flops
  # pylint: enable=g-import-not-at-top
  mesh = parallel.make_mesh()
  if config.bench.checkpoint_dir:
    model = denoiser.Denoiser.load(model_dir_of(config.bench.checkpoint_dir), config, mesh)
    weights = f"ema@{model.step}"
  else:
    model = denoiser.Denoiser.init(config, mesh)
    weights = "random"
  config = model.config
  mode = config.get("synthesis", {}).get("mode", "dfgm")
  size, channels, b = config.data.image_size, len(config.data.modalities), config.sampler.batch_size
  tumors = [input_pipeline.synthetic_example(i, size, channels) for i in range(b)]
  healthy = [input_pipeline.synthetic_example(b + i, size, channels, tumor=False)
             for i in range(b)]
  data = parallel.data_sharding(mesh)
  inputs = [jax.device_put(np.asarray(x), data) for x in (
      np.stack([e["image"] for e in tumors]),
      np.stack([e["mask"] for e in tumors]).astype(np.float32),
      np.stack([e["image"] for e in healthy]), np.arange(b, dtype=np.int32))]
  params = model.params
  plan = sampler_lib.make_plan(model.sampler_config, model.schedule.num_steps)
  start = time.perf_counter()
  compiled = model.sampler(mode, config.seed, mesh).lower(params, *inputs).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, *inputs))  # warm-up
  times = []
  for _ in range(config.bench.reps):
    start = time.perf_counter()
    out = compiled(params, *inputs)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  best = min(times)
  flops = model_flops.flops_per_image(denoiser.model_config(config), image_size=size)
  tflops = plan.nfe * b * flops / best / 1e12
  peak = peak_tflops(config.bench.peak_tflops)
  peak = peak * jax.device_count() if peak else None
  s = config.sampler
  lines = [{
      "benchmark": "sampler",
      "device": device_description(),
      **software(),
      "preset": config.model.preset,
      "image_size": size,
      "batch_size": b,
      "synthesis_mode": mode,  # "mode" is the peer's key (cpu_bench.sh).
      "sampler": s.kind,
      "steps": s.steps,
      "jump_length": s.jump_length,
      "resamples": s.resamples,
      "dtype": config.model.dtype,
      "weights": weights,
      "params": model.num_params,
      "nfe_per_image": plan.nfe,
      "images_per_s": round(b / best, 3),
      "images_per_s_mean": round(b * len(times) / sum(times), 3),
      "nfe_images_per_s": round(plan.nfe * b / best, 1),
      "forward_gflops_per_image": round(flops / 1e9, 3),
      "tflops": round(tflops, 3),
      "peak_fraction": round(tflops / peak, 4) if peak else None,
      "compile_s": round(compile_s, 2),
      "peak_memory_bytes": peak_memory_bytes(),
      "devices": jax.device_count(),
      "finite": bool(np.isfinite(np.asarray(out)).all()),
  }]
  if config.bench.profile_dir:
    lines.append(profile("sampler", compiled,
                         lambda: jax.block_until_ready(compiled(params, *inputs)),
                         config.bench.profile_dir))
  return lines


BENCH_MODELS = ("diffusion", "seg")


def train_benchmark(config) -> list[dict]:
  """The train step of config.bench.model on synthetic batches: the JSON
  lines of launch.benchmark_train.

  diffusion: the diffusion train step, then its profile line with
  bench.profile_dir. seg: the segmenter's step, seeds stacked against one
  at a time (seg_train_benchmark).

  Raises:
    errors.ConfigError: an unknown config.bench.model.
  """
  from dfgm_jax import errors  # pylint: disable=g-import-not-at-top
  model = config.bench.get("model", "diffusion")
  if model not in BENCH_MODELS:
    raise errors.ConfigError(
        f"config.bench.model={model!r}: must be one of {BENCH_MODELS}")
  if model == "seg":
    return [seg_train_benchmark(config)]
  return _diffusion_train_benchmark(config)


def _timed_steps(compiled, state, batch, warmup: int, steps: int):
  """(state, metrics, seconds per step) of `steps` timed calls after `warmup`."""
  import time  # pylint: disable=g-import-not-at-top
  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return state, metrics, (time.perf_counter() - start) / steps


def seg_train_benchmark(config) -> dict:
  """The segmenter's train step (dfgm_jax/train/segmentation.py) on one
  synthetic batch: config.seg.seeds stacked (vmap, one compiled program, as
  the trainer runs them) against one seed at a time (its fallback, and
  config.seg.stack_seeds=sequential: one program per seed, run in turn).

  Rates count every seed's images over the whole run: `images_per_s` is
  the total, `images_per_s_per_seed` = total / seeds (how fast each seed's
  training advances while all of them are trained). step_time_s: one step
  of all seeds (stacked), one step of one seed (one at a time, mean).
  `stacked_speedup` is stacked over one-at-a-time total throughput.
  compile_s of one_at_a_time sums the seeds' compiles (the trainer compiles
  each seed's program).
  """
  # pylint: disable=g-import-not-at-top
  import numpy as np

  from data_pipeline import input_pipeline
  from dfgm_jax import parallel
  from dfgm_jax.train import loop
  from dfgm_jax.train import segmentation
  # pylint: enable=g-import-not-at-top
  seg = config.seg
  segmentation.validate(config)
  mesh = parallel.make_mesh()
  seeds = [int(s) for s in seg.seeds]
  size, channels = int(config.data.image_size), len(config.data.modalities)
  b = int(seg.batch_size)
  examples = [input_pipeline.synthetic_example(i, size, channels) for i in range(b)]
  data = segmentation.from_arrays(np.stack([e["image"] for e in examples]),
                                  np.stack([e["mask"] for e in examples]), b,
                                  name="synthetic")
  warmup, steps = int(config.bench.warmup_steps), int(config.bench.steps)

  def run(group):
    """One group's compile and timed steps, as segmentation._train_group."""
    graphdef, state = segmentation.init_state(config, group)
    state = jax.device_put(state, parallel.replicated(mesh))
    batch = loop.global_batches(loop.stack_batches(
        segmentation._stacked_batch_fn(data, group), 0, 1), mesh)  # pylint: disable=protected-access
    compiled, compile_s = loop.compile_step(
        segmentation.make_train_step(graphdef, config, group), state, batch, mesh,
        name=segmentation.group_name(group))
    state, metrics, step_s = _timed_steps(compiled, state, batch, warmup, steps)
    params = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(state["params"]))
    return {"step_s": step_s, "compile_s": compile_s, "params": params,
            "loss": float(metrics["loss"])}

  stacked = run(seeds)
  alone = [run([s]) for s in seeds]
  n = len(seeds)
  alone_s = sum(r["step_s"] for r in alone)  # one step of every seed, in turn
  losses = [stacked["loss"]] + [r["loss"] for r in alone]
  return {
      "benchmark": "train_seg",
      "device": device_description(),
      **software(),
      "platform": jax.default_backend(),
      "devices": jax.device_count(),
      "image_size": size,
      "channels": channels,
      "batch_size": b,
      "width": int(seg.width),
      "depth": int(seg.depth),
      "bilinear": bool(seg.bilinear),
      "dtype": str(seg.dtype),
      "seeds": n,
      "params_per_seed": stacked["params"],
      "steps": steps,
      "stacked": {
          "images_per_s": round(b * n / stacked["step_s"], 2),
          "images_per_s_per_seed": round(b / stacked["step_s"], 2),
          "step_time_s": round(stacked["step_s"], 4),
          "compile_s": round(stacked["compile_s"], 2),
      },
      "one_at_a_time": {
          "images_per_s": round(b * n / alone_s, 2),
          "images_per_s_per_seed": round(b / alone_s, 2),
          "step_time_s": round(alone_s / n, 4),
          "compile_s": round(sum(r["compile_s"] for r in alone), 2),
      },
      "stacked_speedup": round(alone_s / stacked["step_s"], 3),
      "peak_memory_bytes": peak_memory_bytes(),
      "finite": bool(np.isfinite(losses).all()),
  }


def _diffusion_train_benchmark(config) -> list[dict]:
  """The diffusion train step on synthetic batches: its JSON line, then its
  profile line with bench.profile_dir."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dfgm_jax.diffusion import denoiser  # pylint: disable=g-import-not-at-top
  from dfgm_jax.models import flops as model_flops  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import loop  # pylint: disable=g-import-not-at-top
  from launch import train_data  # pylint: disable=g-import-not-at-top
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
  state, metrics, step_s = _timed_steps(compiled, state, batch,
                                        config.bench.warmup_steps, config.bench.steps)
  mcfg = denoiser.model_config(config)
  # Training FLOPs = 3 x forward (the backward pass costs about twice the
  # forward), counted analytically like the peer's 31.1 GFLOP. XLA's own count
  # is reported too, but on GPU it misses the cuDNN convolution custom calls.
  forward = model_flops.flops_per_image(mcfg, image_size=config.data.image_size)
  train_flops = 3.0 * forward
  tflops = train_flops * b / step_s / 1e12
  peak = peak_tflops(config.bench.peak_tflops)
  per_device_peak = peak * jax.device_count() if peak else None
  lines = [{
      "benchmark": "train",
      "device": device_description(),
      **software(),
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
      "peak_memory_bytes": peak_memory_bytes(),
      "devices": jax.device_count(),
      "final_loss": float(metrics["loss"]),
  }]
  if config.bench.profile_dir:
    def one_step():
      nonlocal state
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
    lines.append(profile("train", compiled, one_step, config.bench.profile_dir,
                         calls=3))
  return lines

