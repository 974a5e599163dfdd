"""The masked, area-normalised epsilon loss (ALGORITHM.md 4.5)."""

import jax
import jax.numpy as jnp


def masked_mse(eps: jax.Array, eps_hat: jax.Array, weight: jax.Array
               ) -> jax.Array:
  """Per-example L_i = sum_p w (eps - eps_hat)^2 / max(sum_p w, 1).

  Args:
    eps, eps_hat: (B, H, W, C) true and predicted noise.
    weight: (B, H, W, 1) or (B, H, W, C) loss weight map (the ring for tumor
      examples, ones for healthy ones).

  Returns:
    (B,) float32 losses. With w = 1 everywhere and C = 1 this is the plain
    per-example MSE; small and large tumors weigh the same.
  """
  err = jnp.square(eps.astype(jnp.float32) - eps_hat.astype(jnp.float32))
  w = jnp.broadcast_to(weight.astype(jnp.float32), err.shape)
  axes = tuple(range(1, err.ndim))
  return jnp.sum(w * err, axis=axes) / jnp.maximum(jnp.sum(w, axis=axes), 1.0)
