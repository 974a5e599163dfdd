"""On-device augmentation of image and mask together (ALGORITHM.md 4.5).

Horizontal flip with probability p_flip for every example; a rotation of up
to +-rot_deg with probability p_rot for tumor examples only (bilinear for the
image with background -1, nearest for the mask). The ring is computed after
augmenting, so it always surrounds the augmented tumor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rotate(image: jax.Array, angle: jax.Array, order: int, cval: float):
  """Rotates one (H, W, C) image by `angle` radians about its center."""
  h, w = image.shape[:2]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_y = cos * (yy - cy) - sin * (xx - cx) + cy
  src_x = sin * (yy - cy) + cos * (xx - cx) + cx

  def channel(c):
    return jax.scipy.ndimage.map_coordinates(c, [src_y, src_x], order=order,
                                             mode="constant", cval=cval)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def augment(key: jax.Array, image: jax.Array, mask: jax.Array,
            is_tumor: jax.Array, p_flip: float = 0.5, p_rot: float = 0.3,
            rot_deg: float = 10.0):
  """Augments a batch: image (B,H,W,C) in [-1,1], mask (B,H,W,1), is_tumor (B,)."""
  b = image.shape[0]
  k_flip, k_rot, k_angle = jax.random.split(key, 3)
  flip = jax.random.uniform(k_flip, (b,)) < p_flip
  image = jnp.where(flip[:, None, None, None], image[:, :, ::-1], image)
  mask = jnp.where(flip[:, None, None, None], mask[:, :, ::-1], mask)
  if p_rot <= 0 or rot_deg <= 0:
    return image, mask
  rotate = (jax.random.uniform(k_rot, (b,)) < p_rot) & (is_tumor > 0)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-rot_deg,
                                         maxval=rot_deg))
  angle = jnp.where(rotate, angle, 0.0)
  image = jax.vmap(lambda x, a: _rotate(x, a, 1, -1.0))(image, angle)
  mask = jax.vmap(lambda x, a: _rotate(x, a, 0, 0.0))(mask, angle)
  return image, mask
