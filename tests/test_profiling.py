"""dfgm_jax/profiling.py: HLO categories and FLOPs, and the trace join."""

import jax
import jax.numpy as jnp
from flax import nnx
import pytest

from dfgm_jax import profiling
from dfgm_jax.models import flops as model_flops
from dfgm_jax.models import unet


def _conv_dot(x, w, m):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(y).reshape(-1, 24) @ m


def test_flops_and_categories_from_compiled_hlo():
  args = (jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 24)), jnp.ones((24, 5)))
  index = profiling.HloIndex(jax.jit(_conv_dot).lower(*args).compile().as_text())
  by_cat = {}
  for inst in index.instructions.values():
    flops = index.flops(inst)
    if flops and inst.computation == index.entry:
      by_cat.setdefault(index.category(inst), []).append(flops)
  # Whatever XLA fuses them into: 2 x out x taps x Cin, and 2 x M x N x K.
  assert by_cat["convolution"] == [2 * (2 * 8 * 8 * 24) * 9 * 16]
  assert by_cat["matmul"] == [2 * 128 * 5 * 24]


# The text XLA:GPU prints for a cuDNN convolution, a cuBLAS gemm and a loop.
GPU_HLO = """HloModule jit_step, entry_computation_layout={()->()}

%body (p.0: (s32[], bf16[64,128,128,64])) -> (s32[], bf16[64,128,128,64]) {
  %p.0 = (s32[], bf16[64,128,128,64]{3,2,1,0}) parameter(0)
  %x.1 = bf16[64,128,128,64]{3,2,1,0} get-tuple-element(%p.0), index=1
  %w.1 = bf16[64,3,3,64]{3,2,1,0} constant({...})
  %custom-call.3 = (bf16[64,128,128,64]{3,2,1,0}, u8[0]{0}) custom-call(%x.1, %w.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", backend_config={"cudnn_conv_backend_config":{}}
  %gte.2 = bf16[64,128,128,64]{3,2,1,0} get-tuple-element(%custom-call.3), index=0
  %a.1 = bf16[4096,512]{1,0} bitcast(%gte.2)
  %b.1 = bf16[512,256]{1,0} constant({...})
  %custom-call.4 = (bf16[4096,256]{1,0}, s8[4194304]{0}) custom-call(%a.1, %b.1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %t.1 = (s32[], bf16[64,128,128,64]) tuple(%i.0, %gte.2)
}

ENTRY %main (a.0: bf16[64,128,128,64]) -> bf16[64,128,128,64] {
  %a.0 = bf16[64,128,128,64]{3,2,1,0} parameter(0)
  %while.1 = (s32[], bf16[64,128,128,64]{3,2,1,0}) while(%t.0), condition=%cond, body=%body
  ROOT %copy.5 = bf16[64,128,128,64]{0,3,2,1} copy(%a.0)
}
"""


def test_gpu_custom_calls_get_flops_and_categories():
  index = profiling.HloIndex(GPU_HLO)
  conv, gemm = index.instructions["custom-call.3"], index.instructions["custom-call.4"]
  assert index.category(conv) == "convolution"
  assert index.flops(conv) == 2.0 * 64 * 128 * 128 * 64 * 9 * 64
  assert index.category(gemm) == "matmul"
  assert index.flops(gemm) == 2.0 * 4096 * 256 * 512
  assert index.category(index.instructions["copy.5"]) == "copy/layout"
  assert index.instructions["while.1"].called == ["cond", "body"]
  assert index.entry == "main"


def _meta(pid, tid, kind, name):
  return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}


def _event(pid, tid, op, ts, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "name": op, "ts": ts, "dur": dur,
          "args": {"hlo_op": op, "hlo_module": "jit_step", **args}}


def test_device_lines_count_each_instruction_once():
  events = [
      _meta(1, 0, "process_name", "/host:CPU"),
      _meta(2, 0, "process_name", "/device:GPU:0"),
      _meta(2, 5, "thread_name", "XLA Ops"),
      _meta(2, 7, "thread_name", "Stream #7(Kernel)"),
      _event(1, 3, "custom-call.3", 0, 999.0),   # host launch: ignored
      _event(2, 5, "custom-call.3", 0, 100.0),   # the instruction
      _event(2, 7, "custom-call.3", 0, 60.0),    # its two kernels
      _event(2, 7, "custom-call.3", 60, 40.0),
      # Named by its whole instruction text, without args (TPU-style lines).
      {"ph": "X", "pid": 2, "tid": 5, "ts": 100, "dur": 50.0,
       "name": '%custom-call.4 = (bf16[4096,256]{1,0}, s8[4194304]{0}) custom-call(%a.1, %b.1)'},
      _event(2, 5, "while.1", 0, 150.0),          # spans its body: ignored
  ]
  report = profiling.op_breakdown(events, GPU_HLO, calls=1)
  assert report["source"] == "device (XLA Ops)"
  assert report["busy_ms"] == pytest.approx(0.150)
  conv = report["categories"]["convolution"]
  assert conv["ms"] == pytest.approx(0.1) and conv["share"] == pytest.approx(2 / 3, abs=1e-3)
  assert conv["tflops"] == pytest.approx(2.0 * 64 * 128**2 * 64 * 9 * 64 / 1e-4 / 1e12,
                                         rel=1e-3)
  # Without the "XLA Ops" line, the kernels of an instruction add up.
  kernels = [e for e in events if not (e.get("tid") == 5 and e["ph"] == "X")]
  report = profiling.op_breakdown(kernels, GPU_HLO, calls=1)
  assert report["source"] == "device"
  assert report["categories"]["convolution"]["ms"] == pytest.approx(0.1)


def test_host_instructions_last_until_their_end_event():
  # An XLA:CPU convolution's own event covers its launch; 'end: op' its end.
  events = [
      _event(1, 3, "custom-call.3", 0, 5.0),
      {"ph": "X", "pid": 1, "tid": 4, "name": "end: custom-call.3", "ts": 995, "dur": 5},
      _event(1, 3, "custom-call.3", 2000, 5.0),
      {"ph": "X", "pid": 1, "tid": 4, "name": "end: custom-call.3", "ts": 2490, "dur": 10},
      _event(1, 3, "copy.5", 3000, 20.0),
  ]
  report = profiling.op_breakdown(events, GPU_HLO, calls=2)
  assert report["source"] == "host threads"
  assert report["categories"]["convolution"]["ms"] == pytest.approx(0.75)  # (1000+500)/2
  assert report["categories"]["copy/layout"]["ms"] == pytest.approx(0.01)


def test_a_real_cpu_trace_accounts_for_the_unet(tmp_path):
  cfg = unet.get_preset("tiny")
  graphdef, params, rest = nnx.split(unet.create_model(cfg, rng=0), nnx.Param, ...)
  b, s = 2, 32
  x, t, c = jnp.ones((b, s, s, 1)), jnp.full((b,), 3), jnp.ones((b,), jnp.int32)
  compiled = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x, t, c, x, x)).lower(
      params, x).compile()
  compiled(params, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      compiled(params, x).block_until_ready()
  report = profiling.op_breakdown(profiling.load_trace_events(str(tmp_path)),
                                  compiled.as_text(), calls=2)
  # Every convolution and matmul of the network ran and was found in the trace.
  want = model_flops.flops_per_image(cfg, image_size=s) * b / 1e9
  assert report["gflop"] == pytest.approx(want, rel=1e-3)
  assert {"convolution", "matmul", "elementwise"} <= set(report["categories"])
  assert all(r["count"] == 1 for r in report["all_ops"])


def test_a_trace_without_the_module_is_refused():
  with pytest.raises(ValueError, match="jit_step"):
    profiling.op_breakdown([_event(1, 1, "fusion.999", 0, 1.0)], GPU_HLO)
