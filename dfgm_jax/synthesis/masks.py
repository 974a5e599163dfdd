"""Boundary-ring masks on device (ALGORITHM.md section 3).

  D = dilate(M, r_out)   disk structuring element
  I = erode(M, r_in)     (M when r_in = 0)
  m = D and not I        the only region the sampler regenerates

Dilation by a disk is a convolution with the disk's indicator followed by a
threshold, which XLA runs on any backend and batches for free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REGIONS = ("ring", "dilated", "inner", "full")


def radius_for_size(r_240: float, image_size: int) -> int:
  """Radius given at 240 px (about mm) scaled to the image grid, e.g. 6 -> 3 at 128."""
  if r_240 <= 0:
    return 0
  return max(1, int(round(r_240 * image_size / 240.0)))


def disk(radius: int) -> np.ndarray:
  """(2r+1, 2r+1) float32 indicator of the Euclidean disk of radius r."""
  y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return (x * x + y * y <= radius * radius + 1e-6).astype(np.float32)


def dilate(mask: jax.Array, radius: int) -> jax.Array:
  """Binary dilation of (B, H, W, 1) {0,1} masks by a disk (float {0,1} out)."""
  if radius <= 0:
    return mask
  kernel = jnp.asarray(disk(radius))[:, :, None, None]
  hits = jax.lax.conv_general_dilated(
      mask.astype(jnp.float32), kernel, window_strides=(1, 1), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  return (hits > 0.5).astype(mask.dtype)


def erode(mask: jax.Array, radius: int) -> jax.Array:
  """Binary erosion by a disk; outside the image counts as background."""
  if radius <= 0:
    return mask
  return 1 - dilate(1 - mask, radius)


def ring(mask: jax.Array, r_out: int, r_in: int = 0) -> jax.Array:
  """m = dilate(M, r_out) minus erode(M, r_in): the generated boundary band."""
  return dilate(mask, r_out) * (1 - erode(mask, r_in))


def region(mask: jax.Array, kind: str, r_out: int, r_in: int = 0) -> jax.Array:
  """The region a mode regenerates / a loss weighs.

  Args:
    mask: tumor masks M (B, H, W, 1).
    kind: 'ring' (dfgm, r_in = 0), 'inner' (dfgm_inner: ring plus a band of
      width r_in inside the tumor), 'dilated' (anomalydiffusion: the whole D),
      'full' (every pixel).
    r_out, r_in: radii in pixels.
  """
  if kind == "ring":
    return ring(mask, r_out, 0)
  if kind == "inner":
    return ring(mask, r_out, r_in)
  if kind == "dilated":
    return dilate(mask, r_out)
  if kind == "full":
    return jnp.ones_like(mask)
  raise ValueError(f"unknown region {kind!r}; expected one of {REGIONS}")
