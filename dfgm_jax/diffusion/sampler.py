"""The blended sampler: regenerate only the ring m, keep everything else.

Equation (1) of the paper, in 0-based steps (ALGORITHM.md section 5):

  x_gen   ~ p_theta(x_{t-1} | x_t, t, c=1, m, M)          DDPM or DDIM step
  x_known = sqrt(abar_{t-1}) y + sqrt(1 - abar_{t-1}) z     z fresh every step
  x_{t-1} = m * x_gen + (1 - m) * x_known

The known part is noised to the level of the step's *output* (t-1), the
off-by-one several public samplers got wrong; at the last step abar_{-1} = 1,
and an exact paste (a select: x0 where m, else y) makes everything outside
the ring equal the input bit for bit, whatever the network returns.

The whole loop is one `lax.scan` over a precomputed transition table: denoise
steps call the network, RePaint undo steps (re-noising to the next level up)
do not, selected with `lax.cond`. Noise for example i at transition s comes
from fold_in(fold_in(key, global_index_i), s), so an example's result does not
depend on the batch it is in or on the number of devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dfgm_jax.diffusion import schedule as schedule_lib

KINDS = ("ddim_blend", "ddpm_blend")

# eps_fn(x_t, t (B,) int32, class_id (B,) int32, ring, tumor) -> eps (B,S,S,C)
EpsFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings (ALGORITHM.md 5.2-5.4, Appendix A `sampler`).

  Attributes:
    kind: 'ddim_blend' (default) or 'ddpm_blend' (ancestral, every step).
    steps: DDIM grid size S (ignored for ddpm_blend, which uses all T).
    eta: DDIM stochasticity (1 reproduces DDPM on the grid).
    jump_length, resamples: RePaint jump schedule; resamples=1 is no jumps.
    start_strength: in (0, 1]; < 1 starts from y noised to grid index
      ceil(s * S) - 1 everywhere (SDEdit-style).
    adaptive_dilation: grow the generated region early (Chebyshev radius
      floor((t + 100) k / 1000), k = 0.1 S at t = T) and shrink it to m.
    final_paste: the exact paste at the end (keep True).
    clip_x0: clip the predicted x0 to [-1, 1].
    unroll: lax.scan unroll factor (compile time grows with it).
  """

  kind: str = "ddim_blend"
  steps: int = 100
  eta: float = 1.0
  jump_length: int = 5
  resamples: int = 2
  start_strength: float = 1.0
  adaptive_dilation: bool = False
  final_paste: bool = True
  clip_x0: bool = True
  unroll: int = 1


def jump_schedule(num_steps: int, jump_length: int, resamples: int) -> list[int]:
  """RePaint's get_schedule_jump: grid indices visited, ending with -1."""
  jumps = {j: resamples - 1 for j in range(0, num_steps - jump_length, jump_length)}
  t, seq = num_steps, []
  while t >= 1:
    t -= 1
    seq.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        seq.append(t)
  seq.append(-1)
  return seq


@dataclasses.dataclass(frozen=True)
class Plan:
  """The transition table of one sampler configuration (numpy, static).

  Attributes:
    grid: (S,) diffusion steps tau_0 < ... < tau_{S-1}.
    frm, to: (N,) grid indices of each transition (-1 = clean).
    start: grid index of the initial noisy x.
  """

  grid: np.ndarray
  frm: np.ndarray
  to: np.ndarray
  start: int

  @property
  def num_transitions(self) -> int:
    return len(self.frm)

  @property
  def nfe(self) -> int:
    """Network evaluations per image: the denoise transitions."""
    return int(np.sum(self.to < self.frm))


def make_plan(cfg: SamplerConfig, num_train_steps: int) -> Plan:
  if cfg.kind not in KINDS:
    raise ValueError(f"unknown sampler {cfg.kind!r}; expected one of {KINDS}")
  if not 0.0 < cfg.start_strength <= 1.0:
    raise ValueError(f"start_strength must be in (0, 1], got {cfg.start_strength}")
  s = num_train_steps if cfg.kind == "ddpm_blend" else cfg.steps
  if not 1 <= s <= num_train_steps:
    raise ValueError(f"sampler steps {s} not in [1, {num_train_steps}]")
  grid = np.round(np.linspace(0, num_train_steps - 1, s)).astype(np.int32)
  start = int(np.ceil(cfg.start_strength * s)) - 1
  jl, r = (1, 1) if cfg.kind == "ddpm_blend" else (cfg.jump_length, cfg.resamples)
  seq = np.asarray(jump_schedule(start + 1, max(jl, 1), max(r, 1)), np.int32)
  return Plan(grid=grid, frm=seq[:-1], to=seq[1:], start=start)


def example_keys(key: jax.Array, example_index: jax.Array) -> jax.Array:
  """(B,) keys, one per global example index."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_index)


def _normal(keys: jax.Array, salt: int, shape) -> jax.Array:
  """Per-example N(0, I) of shape (B,) + shape, independent of batch layout."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt),
                                              shape, jnp.float32))(keys)


def _chebyshev_distance(mask: jax.Array, max_radius: int) -> jax.Array:
  """Square-window distance to `mask` (0 inside), capped at max_radius + 1."""
  dist = jnp.where(mask > 0, 0.0, max_radius + 1.0)
  grown = mask
  for r in range(1, max_radius + 1):
    grown = jax.lax.reduce_window(grown, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                  (1, 1, 1, 1), "SAME")
    dist = jnp.where((grown > 0) & (dist > r), float(r), dist)
  return dist


def blend_sample(eps_fn: EpsFn, sched: schedule_lib.Schedule, cfg: SamplerConfig,
                 y: jax.Array, ring: jax.Array, tumor: jax.Array, key: jax.Array,
                 example_index: jax.Array, *, interior: jax.Array | None = None,
                 return_trajectory: bool = False):
  """Runs the blended sampler; jit it (the plan is static).

  Args:
    eps_fn: the denoiser, eps_fn(x_t, t, class_id, ring, tumor).
    sched: the training noise schedule.
    cfg: sampler settings.
    y: (B,S,S,C) composite images in [-1, 1] (healthy background + pasted tumor).
    ring: (B,S,S,1) region to regenerate (1 = generate).
    tumor: (B,S,S,1) tumor masks M (conditioning).
    key: the run's key.
    example_index: (B,) int32 global indices of the examples.
    interior: (B,S,S,1) region never generated under adaptive dilation
      (default: the tumor).
    return_trajectory: also return x after every transition (tests).

  Returns:
    (B,S,S,C) samples; everything outside `ring` equals y exactly. With
    return_trajectory, (samples, (N,B,S,S,C) trajectory).
  """
  plan = make_plan(cfg, sched.num_steps)
  grid = jnp.asarray(plan.grid)
  abar = jnp.concatenate([jnp.ones((1,), jnp.float32), sched.alphas_cumprod[grid]])
  keys = example_keys(key, example_index)
  b = y.shape[0]
  img_shape = y.shape[1:]
  m = jnp.broadcast_to(ring, y.shape).astype(jnp.float32)
  class_id = jnp.ones((b,), jnp.int32)
  if cfg.adaptive_dilation:
    max_r = max(1, int(round(0.1 * y.shape[1])))
    dist = _chebyshev_distance(ring, max_r)
    keep = 1.0 - (tumor if interior is None else interior)

  def abar_at(i):  # grid index i in [-1, S-1]
    return abar[i + 1]

  def region_at(i):
    if not cfg.adaptive_dilation:
      return m
    t = grid[jnp.maximum(i, 0)].astype(jnp.float32)
    radius = jnp.floor((t + 100.0) * max_r / (sched.num_steps + 100.0))
    grown = (dist <= radius).astype(jnp.float32) * keep
    return jnp.broadcast_to(jnp.maximum(grown, ring), y.shape)

  a0 = abar_at(plan.start)
  noise0 = _normal(keys, 0, img_shape)
  known0 = jnp.sqrt(a0) * y + jnp.sqrt(1.0 - a0) * _normal(keys, 1, img_shape)
  if cfg.start_strength < 1.0:
    x = known0
  else:
    m0 = region_at(plan.start)
    x = m0 * noise0 + (1.0 - m0) * known0

  def denoise(x, frm, to, step_keys):
    t = grid[frm]
    a_t, a_prev = abar_at(frm), abar_at(to)
    eps = eps_fn(x, jnp.full((b,), t, jnp.int32), class_id, ring,
                 tumor).astype(jnp.float32)
    x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    if cfg.clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    z = _normal(step_keys, 0, img_shape)
    if cfg.kind == "ddpm_blend":
      mean = (sched.posterior_mean_coef_x0[t] * x0 +
              sched.posterior_mean_coef_xt[t] * x)
      x_gen = mean + jnp.sqrt(sched.posterior_variance[t]) * z
    else:
      sigma = cfg.eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * jnp.sqrt(
          jnp.maximum(1.0 - a_t / a_prev, 0.0))
      x_gen = (jnp.sqrt(a_prev) * x0 +
               jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps +
               sigma * z)
    known = jnp.sqrt(a_prev) * y + jnp.sqrt(1.0 - a_prev) * _normal(step_keys, 1, img_shape)
    region = region_at(to)
    # A select: outside the region x is the known image whatever the network
    # returned (NaN * 0 would be NaN); the same values for finite inputs.
    return jnp.where(region > 0, x_gen, known)

  def undo(x, frm, to, step_keys):
    # Re-noise the whole image from level frm up to level to = frm + 1.
    ratio = abar_at(to) / abar_at(frm)
    return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * _normal(step_keys, 2, img_shape)

  def body(x, transition):
    s, frm, to = transition
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s + 1))(keys)
    if all_denoise:  # no jumps: every transition calls the network, no branch.
      x = denoise(x, frm, to, step_keys)
    else:
      x = jax.lax.cond(to < frm, denoise, undo, x, frm, to, step_keys)
    return x, (x if return_trajectory else None)

  all_denoise = plan.nfe == plan.num_transitions
  transitions = (jnp.arange(plan.num_transitions, dtype=jnp.int32),
                 jnp.asarray(plan.frm), jnp.asarray(plan.to))
  x, trajectory = jax.lax.scan(body, x, transitions, unroll=cfg.unroll)
  if cfg.final_paste:
    x = jnp.where(m > 0, jnp.clip(x, -1.0, 1.0), y)  # select, as in denoise.
  return (x, trajectory) if return_trajectory else x
