"""Where a compiled program's time goes: a profiler trace joined with its HLO.

`jax.profiler.trace(dir, create_perfetto_trace=True)` records one event per
executed HLO instruction (XLA:CPU thunks on host threads; XLA:GPU kernels and
"XLA Ops" on the device's lines). Joined with the compiled program's HLO text,
each instruction gets a category (convolution, matmul, reduction, ...) and,
for convolutions and dots, its FLOPs from the HLO shapes, so the breakdown
says both where the time goes and how fast each kind of work runs. XLA's own
cost analysis cannot do the latter on GPU: it skips cuDNN custom calls.

  with jax.profiler.trace(d, create_perfetto_trace=True):
    jax.block_until_ready(compiled(*args))
  report = op_breakdown(load_trace_events(d), compiled.as_text(), calls=1)
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re

# Instructions whose events span their children's (loops, branches, calls):
# counting them would count the children twice.
CONTROL_OPCODES = frozenset({"while", "conditional", "call", "async-start",
                             "async-done", "async-update"})
CATEGORIES = ("convolution", "matmul", "attention", "reduction", "rng",
              "elementwise", "copy/layout", "other")

_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|"
                    r"false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Instruction:
  name: str
  computation: str
  opcode: str
  type: str  # result type text, e.g. 'bf16[64,128,128,64]{3,2,1,0}'
  operands: list[str]
  attributes: str  # everything after the operand list
  called: list[str]

  @property
  def shape(self) -> tuple[str, tuple[int, ...]] | None:
    """(dtype, dims) of the result, of its first element for tuples."""
    m = _SHAPE.search(self.type)
    if not m:
      return None
    dims = tuple(int(d) for d in m.group(2).split(",") if d)
    return m.group(1), dims

  @property
  def custom_call_target(self) -> str:
    m = re.search(r'custom_call_target="([^"]*)"', self.attributes)
    return m.group(1) if m else ""

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attributes)
    return m.group(1) if m else ""


def _split_type(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (type, 'op(...)')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:]
  head, _, tail = rest.partition(" ")
  return head, tail


def _split_operands(text: str) -> tuple[list[str], str]:
  """'%a, %b), attrs' -> (['a', 'b'], 'attrs'): operand names, then the rest."""
  depth, i = 1, 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1, "{": 1, "}": -1}.get(ch, 0)
    if depth == 0:
      break
  names = re.findall(r"%([\w.\-]+)", text[:i])
  return names, text[i + 1:]


def parse_hlo(text: str) -> tuple[dict[str, Instruction], str]:
  """Every instruction of an HLO module's text, by (module-unique) name, and
  the name of the entry computation."""
  instructions: dict[str, Instruction] = {}
  computation = entry = ""
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      c = _COMPUTATION.match(line)
      if c:
        computation = c.group(1)
        if line.lstrip().startswith("ENTRY"):
          entry = computation
      continue
    type_text, rest = _split_type(line[m.end():])
    op = _OPCODE.match(rest)
    if not op:
      continue
    operands, attributes = _split_operands(op.group(2))
    called = _CALLS.findall(attributes)
    for branches in _BRANCHES.findall(attributes):
      called += re.findall(r"%([\w.\-]+)", branches)
    instructions[m.group(1)] = Instruction(
        name=m.group(1), computation=computation, opcode=op.group(1),
        type=type_text, operands=operands, attributes=attributes, called=called)
  return instructions, entry


def module_name(text: str) -> str:
  m = re.match(r"\s*HloModule\s+([^\s,]+)", text)
  return m.group(1) if m else ""


class HloIndex:
  """Categories and FLOPs of a module's instructions."""

  def __init__(self, text: str):
    self.module = module_name(text)
    self.instructions, self.entry = parse_hlo(text)
    self.by_computation: dict[str, list[Instruction]] = collections.defaultdict(list)
    for inst in self.instructions.values():
      self.by_computation[inst.computation].append(inst)

  def _dims(self, name: str) -> tuple[int, ...] | None:
    inst = self.instructions.get(name)
    shape = inst.shape if inst else None
    return shape[1] if shape else None

  def _inner(self, inst: Instruction) -> list[Instruction]:
    """The instructions of the computations `inst` calls, recursively."""
    out = []
    for child in self.by_computation_of(inst):
      out.append(child)
      out.extend(self._inner(child))
    return out

  def _conv_flops(self, inst: Instruction) -> float | None:
    """2 x output elements x window taps x input features per group."""
    labels = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", inst.attributes)
    window = re.search(r"window=\{size=([0-9x]+)", inst.attributes)
    out = inst.shape
    kernel = self._dims(inst.operands[1]) if len(inst.operands) > 1 else None
    if not (labels and out and kernel):
      return None
    taps = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
    return 2.0 * math.prod(out[1]) * taps * kernel[labels.group(2).index("i")]

  def _dot_flops(self, inst: Instruction) -> float | None:
    """2 x output elements x contracted elements."""
    lhs = self._dims(inst.operands[0]) if inst.operands else None
    out = inst.shape
    m = (re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attributes) or
         re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attributes))
    if not (lhs and out and m):
      return None
    dims = [int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')]
    return 2.0 * math.prod(out[1]) * math.prod(lhs[d] for d in dims)

  def flops(self, inst: Instruction) -> float | None:
    """FLOPs of one execution of `inst` (convolutions and dots; else None)."""
    if inst.opcode == "convolution":
      return self._conv_flops(inst)
    if inst.opcode == "dot":
      return self._dot_flops(inst)
    if inst.opcode == "custom-call":
      target = inst.custom_call_target.lower()
      # Forward cuDNN convolutions keep the convolution's window/dim_labels;
      # backward ones describe another problem (no FLOPs claimed).
      if "conv" in target and "forward" in target:
        return self._conv_flops(inst)
      if "gemm" in target or "matmul" in target:
        return self._dot_flops(inst)
      return None
    if inst.called and inst.opcode not in CONTROL_OPCODES:
      parts = [self.flops(child) for child in self.by_computation_of(inst)]
      parts = [p for p in parts if p]
      return sum(parts) if parts else None
    return None

  def by_computation_of(self, inst: Instruction) -> list[Instruction]:
    """The instructions of the computations `inst` calls (one level)."""
    return [c for comp in inst.called for c in self.by_computation.get(comp, [])]

  def category(self, inst: Instruction) -> str:
    inner = [inst] + self._inner(inst)
    opcodes = {i.opcode for i in inner}
    targets = " ".join(i.custom_call_target.lower() for i in inner)
    names = " ".join(i.op_name for i in inner)
    if "fmha" in targets or "attention" in targets:
      return "attention"
    if "convolution" in opcodes or "conv" in targets:
      return "convolution"
    if "dot" in opcodes or "gemm" in targets or "matmul" in targets:
      return "matmul"
    if ("rng-bit-generator" in opcodes or "threefry" in targets or
        "threefry" in names or "random_bits" in names):
      return "rng"
    if "reduce" in opcodes or "reduce-window" in opcodes:
      return "reduction"
    if inst.opcode in ("copy", "transpose", "bitcast") or (
        inst.opcode == "fusion" and opcodes <= {"fusion", "parameter", "copy",
                                                "transpose", "bitcast"}):
      return "copy/layout"
    if inst.opcode == "fusion" or opcodes & {"add", "multiply", "tanh", "select"}:
      return "elementwise"
    return "other"


def load_trace_events(trace_dir: str) -> list[dict]:
  """Events of the newest `*.trace.json.gz` under `trace_dir`."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(
        f"{trace_dir}: no *.trace.json.gz (was the trace taken with "
        "create_perfetto_trace=True?)")
  with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
    return json.load(f)["traceEvents"]


def _names(events: list[dict], kind: str) -> dict:
  """{pid or (pid, tid): name} from the trace's 'M' metadata events."""
  out = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == kind:
      key = e.get("pid") if kind == "process_name" else (e.get("pid"), e.get("tid"))
      out[key] = (e.get("args") or {}).get("name", "")
  return out


def op_events(events: list[dict], index: HloIndex) -> tuple[list[tuple[str, float]], str]:
  """[(instruction, microseconds)] of the module's executed instructions.

  Device lines win over host lines when the trace has both (GPU/TPU); among a
  device's lines, "XLA Ops" (one event per instruction) wins over kernel
  streams (one per kernel, several per instruction) so nothing counts twice.
  """
  matched = []
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    args = e.get("args") or {}
    # Device "XLA Ops" events may be named by the whole instruction text,
    # '%fusion.3 = bf16[...] fusion(...), ...': keep the name.
    op = args.get("hlo_op") or e.get("name", "").split(" = ")[0].strip().lstrip("%")
    module = args.get("hlo_module")
    if op not in index.instructions or (module and index.module and
                                        not module.startswith(index.module)):
      continue
    if index.instructions[op].opcode in CONTROL_OPCODES:
      continue
    matched.append((e, op))
  processes, threads = _names(events, "process_name"), _names(events, "thread_name")
  on_device = [(e, op) for e, op in matched
               if "/device:" in processes.get(e.get("pid"), "")]
  if not on_device:
    return _host_durations(events, matched), "host threads"
  ops_lines = [(e, op) for e, op in on_device
               if "XLA Ops" in threads.get((e.get("pid"), e.get("tid")), "")]
  if ops_lines:
    return [(op, float(e["dur"])) for e, op in ops_lines], "device (XLA Ops)"
  return [(op, float(e["dur"])) for e, op in on_device], "device"


def _host_durations(events: list[dict], starts: list[tuple[dict, str]]):
  """XLA:CPU instruction times: from its event's start to its 'end: op' event.

  Some thunks (convolutions on Eigen's pool) only launch their work inside
  their own event, which then lasts ~50 us of a 6 ms convolution; the
  matching 'end: <op>' event marks completion. The k-th start of an op pairs
  with the first unused end after it (an op never overlaps itself).
  """
  ends = collections.defaultdict(list)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and name.startswith("end: "):
      ends[name[5:]].append(float(e["ts"]) + float(e.get("dur", 0.0)))
  for times in ends.values():
    times.sort()
  used = collections.Counter()
  out = []
  for e, op in sorted(starts, key=lambda pair: float(pair[0]["ts"])):
    start, dur = float(e["ts"]), float(e["dur"])
    times, k = ends.get(op, []), used[op]
    while k < len(times) and times[k] < start:
      k += 1
    if k < len(times):
      dur = max(dur, times[k] - start)
      k += 1
    used[op] = k
    out.append((op, dur))
  return out


def op_breakdown(events: list[dict], hlo_text: str, *, calls: int = 1,
                 top: int = 15) -> dict:
  """Time, share and achieved TFLOP/s per category and per instruction.

  Times are per call of the program (the trace covered `calls` calls). On
  XLA:CPU instructions run on several threads at once, so the busy time can
  exceed the wall time; the shares are of the busy time.
  """
  index = HloIndex(hlo_text)
  timed, source = op_events(events, index)
  if not timed:
    raise ValueError(f"the trace has no events of HLO module {index.module!r}")
  per_op = collections.defaultdict(lambda: [0.0, 0])
  for op, us in timed:
    per_op[op][0] += us
    per_op[op][1] += 1
  busy_us = sum(us for us, _ in per_op.values())
  rows = []
  for op, (us, count) in per_op.items():
    inst = index.instructions[op]
    flops = index.flops(inst)
    shape = inst.shape
    rows.append({
        "op": op,
        "category": index.category(inst),
        "ms": us / calls / 1e3,
        "share": us / busy_us,
        "count": count / calls,
        "shape": f"{shape[0]}[{','.join(map(str, shape[1]))}]" if shape else inst.type,
        "gflop": flops * count / calls / 1e9 if flops else None,
        "tflops": flops * count / (us * 1e-6) / 1e12 if flops and us else None,
    })
  rows.sort(key=lambda r: -r["ms"])
  categories = {}
  for cat in CATEGORIES:
    mine = [r for r in rows if r["category"] == cat]
    if not mine:
      continue
    ms = sum(r["ms"] for r in mine)
    gflop = sum(r["gflop"] or 0.0 for r in mine)
    categories[cat] = {
        "ms": round(ms, 3), "share": round(ms * 1e3 * calls / busy_us, 4),
        "ops": len(mine), "gflop": round(gflop, 3),
        "tflops": round(gflop / ms, 3) if gflop and ms else None}

  def rounded(row):
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}

  return {
      "module": index.module,
      "source": source,
      "busy_ms": round(busy_us / calls / 1e3, 3),
      "gflop": round(sum(r["gflop"] or 0.0 for r in rows), 3),
      "categories": categories,
      "top_ops": [rounded(r) for r in rows[:top]],
      "all_ops": [rounded(r) for r in rows],
  }
