"""The synthesis modes (ALGORITHM.md 8): what is generated, from what.

| mode             | generated region m        | known image |
|------------------|---------------------------|-------------|
| real_only        | none (no synthetic set)   | -           |
| cutpaste         | none                      | y           |
| anomalydiffusion | D = dilate(M, r_out)      | h           |
| dfgm (default)   | D and not M (the ring)    | y           |
| dfgm_inner       | D and not erode(M, r_in)  | y           |

y = M * x + (1 - M) * h is the cut-paste composite (a select, as is every
paste: a NaN on one side cannot reach the other). All modes share the
sampler, matching and placement; only m and the known image change. The
sampler hands m to the network as its conditioning mask, so a model serves
only the modes whose m is the region it was trained on
(Denoiser.check_mode; an anomalydiffusion model is trained on D).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dfgm_jax import errors
from dfgm_jax.diffusion import sampler as sampler_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.synthesis import masks

MODES = ("real_only", "cutpaste", "anomalydiffusion", "dfgm", "dfgm_inner")
_REGION = {"anomalydiffusion": "dilated", "dfgm": "ring", "dfgm_inner": "inner"}


def uses_diffusion(mode: str) -> bool:
  if mode not in MODES:
    raise errors.ConfigError(
        f"config.synthesis.mode={mode}: unknown mode; expected one of {MODES}")
  return mode in _REGION


def generated_region(mode: str) -> str:
  """The masks.region kind a diffusion mode generates (and conditions the network on)."""
  if not uses_diffusion(mode):
    raise ValueError(f"mode {mode!r} generates nothing")
  return _REGION[mode]


def known_and_region(mode: str, x: jax.Array, tumor: jax.Array, h: jax.Array,
                     r_out: int, r_in: int = 0):
  """(known image, generated region) of a batch for `mode`.

  Args:
    mode: one of MODES except real_only.
    x: (B,S,S,C) private tumor slices; tumor: (B,S,S,1) their masks (already
      placed); h: (B,S,S,C) the matched healthy slices.
    r_out, r_in: ring radii in pixels.
  """
  # A select, not m*a + (1-m)*b: a NaN on one side cannot reach the other.
  y = jnp.where(tumor > 0, x, h)
  if mode == "cutpaste":
    return y, jnp.zeros_like(tumor)
  if mode == "anomalydiffusion":
    return h, masks.region(tumor, "dilated", r_out)
  if mode in ("dfgm", "dfgm_inner"):
    return y, masks.region(tumor, _REGION[mode], r_out, r_in)
  raise ValueError(f"mode {mode!r} produces no images")


def synthesize_batch(mode: str, eps_fn: Callable, sched: schedule_lib.Schedule,
                     scfg: sampler_lib.SamplerConfig, x: jax.Array,
                     tumor: jax.Array, h: jax.Array, key: jax.Array,
                     example_index: jax.Array, r_out: int, r_in: int = 0
                     ) -> jax.Array:
  """One batch of synthetic images (jit it; mode and configs are static)."""
  known, region = known_and_region(mode, x, tumor, h, r_out, r_in)
  if not uses_diffusion(mode):
    return known
  return sampler_lib.blend_sample(eps_fn, sched, scfg, known, region, tumor,
                                  key, example_index)
