"""Device facts shared by the benchmarks: peak FLOP/s, memory, description."""

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
