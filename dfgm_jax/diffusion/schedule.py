"""Noise schedules, q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0).

Steps are 0-based, t in {0..T-1}, with alpha_bar_{-1} := 1 (ALGORITHM.md 4.4).
Tables are built in float64 with numpy and stored as float32 jnp arrays, so a
schedule is a pytree that can be passed into jitted code or closed over.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """Per-step tables, each of shape (T,)."""

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance: jax.Array
  posterior_mean_coef_x0: jax.Array
  posterior_mean_coef_xt: jax.Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def betas_for(kind: str, num_steps: int, beta_start: float = 1e-4,
              beta_end: float = 0.02) -> np.ndarray:
  """Linear (Ho et al.) or cosine (Nichol & Dhariwal) betas, float64."""
  if kind == "linear":
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  if kind == "cosine":
    s = 0.008
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)])
  raise ValueError(f"unknown schedule {kind!r}; use linear or cosine")


def make_schedule(kind: str = "linear", num_steps: int = 1000,
                  beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  betas = betas_for(kind, num_steps, beta_start, beta_end)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # log of the variance clipped at t=0 (where it is 0), as in ADM.
  post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
  tables = dict(
      betas=betas, alphas=alphas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      posterior_variance=post_var, posterior_log_variance=post_log_var,
      posterior_mean_coef_x0=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef_xt=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in tables.items()})


def _bcast(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] shaped (B, 1, ..., 1) to broadcast against (B, H, W, C)."""
  return values[t].reshape((-1,) + (1,) * (ndim - 1))


def q_sample(s: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array
             ) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
  return (_bcast(s.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
          _bcast(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def predict_x0(s: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array,
               clip: bool = True) -> jax.Array:
  x0 = ((x_t - _bcast(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * eps) /
        _bcast(s.sqrt_alphas_cumprod, t, x_t.ndim))
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def q_posterior(s: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Mean and variance of q(x_{t-1} | x_t, x0); the variance is 0 at t = 0."""
  mean = (_bcast(s.posterior_mean_coef_x0, t, x_t.ndim) * x0 +
          _bcast(s.posterior_mean_coef_xt, t, x_t.ndim) * x_t)
  return mean, _bcast(s.posterior_variance, t, x_t.ndim)
