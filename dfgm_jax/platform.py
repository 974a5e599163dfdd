"""XLA flags measured to help this project, added before JAX starts a backend.

XLA:CPU in jaxlib 0.10 hands convolutions, reductions and elementwise
fusions to YNNPACK by default; for this UNet (3x3 convolutions of 64-256
channels, GroupNorm) that path is about 2x slower than XLA's own emitters on
the 2-core CPU boxes: forward of the `small` preset at 64 x 64, batch 4,
350-540 ms with YNNPACK, 210-280 ms without; the blended sampler benchmark
0.78 -> 1.48 images/s (README, Benchmarks). Unknown XLA flags abort the
process, so a flag is only added for jaxlib versions it was measured on.
Enabling one YNNPACK fusion type at a time (the flag takes a list) was
slower than none for every type: forward min/median ms, none 196/207,
individual_dot 199/243, dot 210/257, eltwise 248/289, reduce 258/300,
individual_convolution 296/369 (2026-11-27, same machine, before the
GroupNorm rewrite of that day).
Set DFGM_XLA_TUNING=0 to keep XLA's defaults; a flag already present in
XLA_FLAGS is left as the user set it.
"""

from __future__ import annotations

import importlib.metadata
import os

# flag -> (value, jaxlib version prefixes it was measured with)
CPU_FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": ("", ("0.10.",)),
}


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def apply_xla_flags(environ=None) -> list[str]:
  """Appends the measured flags to XLA_FLAGS; returns those added.

  Call before the first JAX computation (XLA reads XLA_FLAGS when a backend
  starts; importing jax does not start one).
  """
  environ = os.environ if environ is None else environ
  if environ.get("DFGM_XLA_TUNING", "1") == "0":
    return []
  version = _jaxlib_version()
  current = environ.get("XLA_FLAGS", "")
  added = []
  for flag, (value, versions) in CPU_FLAGS.items():
    if flag in current or not version.startswith(versions):
      continue
    added.append(f"{flag}={value}")
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
