"""DP-SGD for the diffusion training: sampling, clipped noisy gradients, accounting.

The optional `config.dp` (off by default; ALGORITHM.md 9) makes G1's training
differentially private for the private tumor slices. The public healthy
slices cost no privacy and keep their ordinary gradient. Three pieces:

- Sampling (numpy, `PoissonSampler`): every step draws each private unit (a
  patient, or a slice when dp.unit='example') independently with probability
  q (Poisson sampling) and takes `slices_per_patient` of a drawn patient's
  slices (with replacement). A compiled step needs fixed shapes, so the drawn
  units fill `max_units` slots, the rest padding; in the rare step that draws
  more, a random subset of max_units is kept (truncated Poisson sampling).
  max_units is the binomial quantile at 1 - TRUNCATION_TAIL, so truncation
  happens with probability <= 1e-9 per step. The public part is a fixed
  round(batch_size * p_healthy) healthy slices drawn as in batches.MixedSampler.
- Gradient (JAX, `private_grads`): per unit, the gradient of the sum of its
  examples' losses, clipped to clip_norm in L2 over all parameters; the sum
  of the clipped unit gradients plus Gaussian noise of std
  noise_multiplier * clip_norm; plus the public examples' unclipped gradient;
  all divided by train.batch_size (the expected number of examples: the loss
  of the non-DP step is the batch mean).
- Accounting (`Accountant`, dp-accounting): epsilon at the configured delta
  after n steps, add-or-remove-one adjacency on units. 'rdp' (RdpAccountant,
  Poisson-sampled Gaussian; it has no truncated event, which the 1e-9 tail
  makes negligible, not exact) or 'pld' (PLDAccountant's PLD: the truncated
  Poisson event when max_units < num_units, exact for the sampler; about 1 s
  of host time per epsilon against 0.15 s for rdp).

What the epsilon covers, and what it does not:
- Covered: G1's training on the private tumor slices of train.center (or of
  each federated client's center), with a patient (dp.unit='patient') or a
  slice ('example') as the unit: adding or removing one patient's slices
  changes the distribution of the trained weights by at most (epsilon,
  delta). Everything computed from those weights alone (G1's export, its
  samples) inherits the guarantee.
- Not covered: the healthy slices, used unclipped and unnoised. They must be
  public data, and are: preprocessing puts only public-origin slices (volumes
  of non-private centers) in the `healthy` split by default, and
  launch/train_data.py check_dp_public_pool refuses DP when the split holds
  private patients' slices (data.healthy_include_private, a research switch)
  or records no origins, rather than count them as units.
- Not covered: what is published beside the weights. A DFGM synthetic set
  pastes each private tumor interior verbatim into a public background; that
  copy is outside any epsilon of the training. Nor is the choice of n_shot
  slices, the patient split or hyperparameters tuned on private data.

train/diffusion.py's step calls private_grads when dp.enabled, and its
train() refuses a run whose configured steps would spend more than
dp.target_epsilon and writes `dp_epsilon` into every metrics row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dfgm_jax import errors

UNITS = ("patient", "example")
ACCOUNTANTS = ("rdp", "pld")
# Per-step probability that Poisson sampling draws more units than the slots.
TRUNCATION_TAIL = 1e-9
# PLDAccountant's default discretisation (its epsilons are what we report).
_PLD_INTERVAL = 1e-4

# --- Sampling plan -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
  """What the accountant needs to know about the sampler (and the step's shapes).

  Attributes:
    unit: 'patient' or 'example', the unit of privacy.
    num_units: private units N (patients, or slices).
    sampling_probability: q, each unit's chance to be drawn at a step.
    max_units: unit slots per step (global); more drawn units are truncated.
    slices_per_unit: examples per unit slot (1 for unit='example').
    public_per_step: healthy examples per step (global).
  """

  unit: str
  num_units: int
  sampling_probability: float
  max_units: int
  slices_per_unit: int
  public_per_step: int

  @property
  def truncates(self) -> bool:
    return self.max_units < self.num_units

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def public_per_step(config) -> int:
  """Healthy examples per DP step: round(batch_size * p_healthy)."""
  return int(round(config.train.batch_size * config.train.p_healthy))


def _binomial_cap(n: int, q: float, tail: float) -> int:
  """Smallest c with P(Binomial(n, q) > c) <= tail."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if q >= 1.0:
    return n
  c = int(stats.binom.isf(tail, n, q))
  while c < n and stats.binom.sf(c, n, q) > tail:
    c += 1
  return min(max(c, 1), n)


def plan_sampling(config, num_units: int, slot_multiple: int = 1) -> Sampling:
  """The Poisson sampling of config.dp for N = num_units private units.

  The expected number of private examples per step is batch_size minus the
  public ones, i.e. (batch_size - public) / slices_per_unit units, so q is
  that over N (at most 1: with fewer units than that, every unit is in every
  step and sampling amplifies nothing).

  Args:
    config: the full config (train, dp).
    num_units: N, the private patients (or slices, unit='example').
    slot_multiple: max_units is rounded up to a multiple of this (the device
      count, so that every device holds whole unit slots).

  Raises:
    errors.ConfigError: no private units, or no private share in the batch.
  """
  d = config.dp
  m = d.slices_per_patient if d.unit == "patient" else 1
  pub = public_per_step(config)
  expected = (config.train.batch_size - pub) / m
  if num_units < 1:
    raise errors.ConfigError(
        "config.dp.enabled=True: the private split has no tumor slices to "
        "protect (train without DP, or pick another config.train.center)")
  if expected <= 0:
    raise errors.ConfigError(
        f"config.train.p_healthy={config.train.p_healthy!r}: with "
        f"config.dp.enabled=True the batch of {config.train.batch_size} must "
        "keep a private share (p_healthy < 1)")
  q = min(1.0, expected / num_units)
  if expected > num_units:
    logging.warning("DP: %.1f expected private %ss per step but only %d exist; "
                    "q = 1 (every %s every step, no amplification)", expected,
                    d.unit, num_units, d.unit)
  cap = _binomial_cap(num_units, q, TRUNCATION_TAIL)
  cap = -(-cap // slot_multiple) * slot_multiple
  return Sampling(unit=d.unit, num_units=int(num_units),
                  sampling_probability=float(q), max_units=int(cap),
                  slices_per_unit=int(m), public_per_step=pub)


# --- Sampler (numpy) -----------------------------------------------------------------


def unit_groups(unit: str, num_examples: int, patient_ids=None) -> list[np.ndarray]:
  """Example indices of each privacy unit, in a fixed order.

  unit='example': one group per slice. unit='patient': the slices of each
  patient id (sorted ids); without ids (the synthetic reader) every slice is
  its own patient.
  """
  if unit == "example" or patient_ids is None:
    return [np.array([i]) for i in range(num_examples)]
  ids = np.asarray(patient_ids)
  if len(ids) != num_examples:
    raise ValueError(f"{len(ids)} patient ids for {num_examples} slices")
  return [np.flatnonzero(ids == p) for p in sorted(set(ids.tolist()))]


class PoissonSampler:
  """Host-local DP batches; a pure function of (seed, step, process).

  batch(step) returns the public part as `image`, `mask` (zeros), `is_tumor`
  (zeros), public_per_step / process_count examples, and the private part as
  `dp_image`, `dp_mask`, `dp_valid` (1 for a drawn unit's slice, 0 for a
  padding slot), max_units / process_count unit slots of slices_per_unit
  slices each, unit-major. The units are drawn identically on every process
  (one global Poisson sample, truncated globally), process p keeping the
  drawn units p, p + P, ...; so every process holds the whole private split.

  Args:
    healthy: {'image': (N_h, S, S, C)} public slices (this process's share).
    tumor: {'image': (N, S, S, C), 'mask': (N, S, S, 1)}: the whole private
      split.
    groups: unit_groups(...) over the tumor slices.
    sampling: plan_sampling(...) for len(groups) units.
    seed: sampler seed.
    process_index, process_count: this process and how many there are.
  """

  def __init__(self, healthy: dict, tumor: dict, groups: list[np.ndarray],
               sampling: Sampling, seed: int, process_index: int = 0,
               process_count: int = 1):
    if len(groups) != sampling.num_units:
      raise ValueError(f"{len(groups)} unit groups, plan for {sampling.num_units}")
    for name, total in (("max_units", sampling.max_units),
                        ("public_per_step", sampling.public_per_step)):
      if total % process_count:
        raise ValueError(f"{name}={total} not divisible by {process_count} "
                         "processes")
    self.healthy_image = np.asarray(healthy["image"], np.float32)
    if sampling.public_per_step and not len(self.healthy_image):
      raise ValueError("no healthy examples but p_healthy > 0")
    self.tumor_image = np.asarray(tumor["image"], np.float32)
    self.tumor_mask = np.asarray(tumor["mask"], np.float32)
    self.groups = groups
    self.dp_sampling = sampling
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.truncated_steps = 0

  def draw_units(self, step: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(drawn unit ids, their slice indices): the same on every process."""
    s = self.dp_sampling
    rng = np.random.default_rng([self.seed, step, 0xD9])
    drawn = np.flatnonzero(rng.random(s.num_units) < s.sampling_probability)
    if len(drawn) > s.max_units:
      # Truncated Poisson sampling: a uniformly random subset of max_units.
      self.truncated_steps += 1
      logging.warning("DP sampler step %d: %d units drawn, %d slots; kept a "
                      "random subset", step, len(drawn), s.max_units)
      drawn = np.sort(rng.choice(drawn, s.max_units, replace=False))
    slices = [self.groups[u][rng.integers(0, len(self.groups[u]),
                                          s.slices_per_unit)] for u in drawn]
    return drawn, slices

  def batch(self, step: int) -> dict:
    s = self.dp_sampling
    p, count = self.process_index, self.process_count
    _, slices = self.draw_units(step)
    mine = slices[p::count]
    slots = s.max_units // count
    m = s.slices_per_unit
    # Padding slots repeat slice 0 (valid = 0): real data keeps the padded
    # units' losses finite, and their gradients are masked out.
    idx = np.zeros((slots, m), np.int64)
    valid = np.zeros((slots, m), np.int32)
    for j, ex in enumerate(mine):
      idx[j], valid[j] = ex, 1
    idx, valid = idx.reshape(-1), valid.reshape(-1)
    n_pub = s.public_per_step // count
    rng = np.random.default_rng([self.seed, step, p])
    h_idx = rng.integers(0, max(len(self.healthy_image), 1), n_pub)
    shape = self.tumor_image.shape[1:]
    return {
        "image": (self.healthy_image[h_idx] if n_pub else
                  np.zeros((0,) + shape, np.float32)),
        "mask": np.zeros((n_pub,) + shape[:2] + (1,), np.float32),
        "is_tumor": np.zeros((n_pub,), np.int32),
        "dp_image": self.tumor_image[idx],
        "dp_mask": self.tumor_mask[idx],
        "dp_valid": valid,
    }


def make_sampler(config, healthy: dict, tumor: dict, patient_ids=None, *,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 slot_multiple: int | None = None) -> PoissonSampler:
  """The DP sampler of config.dp over a private split (and its patient ids).

  Args:
    config: the full config (train, dp).
    healthy: this process's public healthy slices {'image'}.
    tumor: the whole private split {'image', 'mask'} (after the n_shot choice).
    patient_ids: one id per tumor slice (the slices' case_id); None makes
      every slice its own patient (synthetic data).
    process_index, process_count, slot_multiple: default to JAX's process
      and device counts.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if slot_multiple is None:
    slot_multiple = jax.device_count()
  groups = unit_groups(config.dp.unit, len(tumor["image"]), patient_ids)
  sampling = plan_sampling(config, len(groups), slot_multiple)
  logging.info("DP sampling: %s", sampling)
  return PoissonSampler(healthy, tumor, groups, sampling,
                        config.train.sampler_seed, process_index, process_count)


# --- Clipped, noisy gradient (JAX) ---------------------------------------------------


def _unit_norms(tree) -> jax.Array:
  """(U,) L2 norm over all leaves of each unit's gradient (leading axis U)."""
  sq = [jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(sq))


def gaussian_noise(key, tree, std) -> object:
  """Independent N(0, std^2) of each parameter, shaped like `tree`."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      std * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
      for k, x in zip(keys, leaves)])


def private_grads(per_example_loss: Callable, params, public: dict,
                  private: dict, key, *, clip_norm: float,
                  noise_multiplier: float, slices_per_unit: int,
                  expected_batch: float) -> tuple[object, dict]:
  """The DP-SGD gradient of the mean loss over public and private examples.

  g = (sum_public grad l_i + sum_units clip(grad sum_{i in u} l_i)
       + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_batch,
  clip(v) = v * min(1, clip_norm / |v|). Padding units (valid 0) add nothing.

  Args:
    per_example_loss: (params, batch, key) -> (b,) losses, for any batch of
      the form of `public` / a unit's slice of `private` (same keys).
    params: the parameter tree.
    public: a batch of public examples (leading axis may be 0).
    private: a batch of U * slices_per_unit private examples, unit-major,
      with `valid` (U * slices_per_unit,) 1 for real slices, 0 for padding.
    key: this step's key (split into public, per-unit and noise keys).
    clip_norm, noise_multiplier: C and sigma.
    slices_per_unit: m.
    expected_batch: the divisor (train.batch_size).

  Returns:
    (grads, aux): aux holds loss_sum and examples (the valid examples' loss
    sum and count), units (valid units), unit_grad_norm (mean norm before
    clipping over valid units) and clipped_frac (share of valid units clipped).
  """
  k_pub, k_priv, k_noise = jax.random.split(key, 3)
  valid_ex = private["valid"].astype(jnp.float32)
  batch = {k: v for k, v in private.items() if k != "valid"}
  m = slices_per_unit
  num_units = valid_ex.shape[0] // m
  units = jax.tree.map(lambda x: x.reshape((num_units, m) + x.shape[1:]), batch)
  valid = valid_ex.reshape(num_units, m)[:, 0]

  def summed(p, b, k):
    losses = per_example_loss(p, b, k)
    return jnp.sum(losses), losses

  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k_priv,
                                                         jnp.arange(num_units))
  (_, unit_losses), unit_grads = jax.vmap(
      jax.value_and_grad(summed, has_aux=True), in_axes=(None, 0, 0))(
          params, units, keys)
  norms = _unit_norms(unit_grads)
  ok = valid > 0
  # where, not a product: a padding unit's gradient must not leak a NaN.
  scale = jnp.where(ok, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12)),
                    0.0)
  clipped = jax.tree.map(
      lambda g: jnp.tensordot(scale, jnp.where(
          ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0).astype(jnp.float32),
                              axes=1).astype(g.dtype), unit_grads)
  noise = gaussian_noise(k_noise, params, noise_multiplier * clip_norm)
  total = jax.tree.map(jnp.add, clipped, noise)
  loss_sum = jnp.sum(jnp.where(valid_ex.reshape(num_units, m) > 0,
                               unit_losses, 0.0))
  examples = jnp.sum(valid_ex)
  if jax.tree.leaves(public)[0].shape[0]:
    (pub_sum, _), pub_grads = jax.value_and_grad(summed, has_aux=True)(
        params, public, k_pub)
    total = jax.tree.map(jnp.add, total, pub_grads)
    loss_sum += pub_sum
    examples += jax.tree.leaves(public)[0].shape[0]
  grads = jax.tree.map(lambda g: g / expected_batch, total)
  n_valid = jnp.maximum(jnp.sum(valid), 1.0)
  aux = {
      "loss_sum": loss_sum,
      "examples": examples,
      "units": jnp.sum(valid),
      "unit_grad_norm": jnp.sum(jnp.where(ok, norms, 0.0)) / n_valid,
      "clipped_frac": jnp.sum(jnp.where(ok & (norms > clip_norm), 1.0, 0.0))
                      / n_valid,
  }
  return grads, aux


# --- Accounting ---------------------------------------------------------------------


class Accountant:
  """Epsilon of n DP steps at a fixed delta (dp-accounting).

  Args:
    sampling: the sampler's plan.
    noise_multiplier: sigma.
    delta: the target delta.
    kind: 'rdp' (RdpAccountant, Poisson-sampled Gaussian) or 'pld'
      (PLDAccountant's distributions; the truncated Poisson event when the
      sampler can truncate).
  """

  def __init__(self, sampling: Sampling, noise_multiplier: float, delta: float,
               kind: str = "rdp"):
    if kind not in ACCOUNTANTS:
      raise ValueError(f"accountant {kind!r}: one of {ACCOUNTANTS}")
    self.sampling = sampling
    self.noise_multiplier = float(noise_multiplier)
    self.delta = float(delta)
    self.kind = kind
    self._pld_step = None
    self._cache: dict[int, float] = {}

  def event(self, steps: int):
    """The dp_accounting event of `steps` DP steps."""
    import dp_accounting  # pylint: disable=g-import-not-at-top
    s = self.sampling
    if self.kind == "pld" and s.truncates:
      one = dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=s.num_units, sampling_probability=s.sampling_probability,
          truncated_batch_size=s.max_units,
          noise_multiplier=self.noise_multiplier)
    else:
      one = dp_accounting.PoissonSampledDpEvent(
          s.sampling_probability,
          dp_accounting.GaussianDpEvent(self.noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(one, int(steps))

  def _pld_epsilon(self, steps: int) -> float:
    # PLDAccountant builds the one-step distribution on every call (1-3 s);
    # building it once and self-composing it is the same computation.
    from dp_accounting.pld import privacy_loss_distribution as pld  # pylint: disable=g-import-not-at-top
    s = self.sampling
    if self._pld_step is None:
      if s.truncates:
        self._pld_step = pld.from_truncated_subsampled_gaussian_mechanism(
            dataset_size=s.num_units,
            sampling_probability=s.sampling_probability,
            truncated_batch_size=s.max_units,
            noise_multiplier=self.noise_multiplier,
            value_discretization_interval=_PLD_INTERVAL)
      else:
        self._pld_step = pld.from_gaussian_mechanism(
            standard_deviation=self.noise_multiplier,
            sampling_prob=s.sampling_probability,
            value_discretization_interval=_PLD_INTERVAL)
    return float(self._pld_step.self_compose(steps).get_epsilon_for_delta(
        self.delta))

  def epsilon(self, steps: int) -> float:
    """Epsilon after `steps` steps (0 for none; inf without noise)."""
    steps = int(steps)
    if steps <= 0 or self.sampling.sampling_probability == 0:
      return 0.0
    if self.noise_multiplier == 0:
      return math.inf
    if steps not in self._cache:
      if self.kind == "pld":
        eps = self._pld_epsilon(steps)
      else:
        from dp_accounting import rdp  # pylint: disable=g-import-not-at-top
        acct = rdp.RdpAccountant()
        acct.compose(self.event(steps))
        eps = float(acct.get_epsilon(self.delta))
      self._cache[steps] = eps
    return self._cache[steps]

  def max_steps(self, target_epsilon: float, multiple: int = 1) -> int:
    """The most steps (a multiple of `multiple`) whose epsilon <= target."""
    if self.epsilon(multiple) > target_epsilon:
      return 0
    lo, hi = 1, 2  # in units of `multiple`; epsilon grows with the steps.
    while self.epsilon(hi * multiple) <= target_epsilon:
      lo, hi = hi, hi * 2
      if hi > 1 << 40:
        return hi * multiple
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if self.epsilon(mid * multiple) <= target_epsilon:
        lo = mid
      else:
        hi = mid
    return lo * multiple


def accountant_for(config, sampling: Sampling) -> Accountant:
  d = config.dp
  return Accountant(sampling, d.noise_multiplier, d.delta, d.accountant)


def check_budget(config, accountant: Accountant, steps: int,
                 multiple: int = 1,
                 steps_field: str = "config.train.num_steps") -> float:
  """Epsilon of `steps` steps; refuses them when they exceed dp.target_epsilon.

  steps_field: the setting that makes the steps, named in the refusal (the
  federated engine's: config.fed.rounds x config.fed.local_steps).

  Raises:
    errors.ConfigError: naming dp.target_epsilon, the steps, sigma, q, delta,
      the epsilon they reach and the most steps the budget allows.
  """
  d = config.dp
  eps = accountant.epsilon(steps)
  if d.target_epsilon > 0 and eps > d.target_epsilon:
    most = accountant.max_steps(d.target_epsilon, multiple)
    s = accountant.sampling
    raise errors.ConfigError(
        f"config.dp.target_epsilon={d.target_epsilon!r}: {steps} steps "
        f"({steps_field}) with config.dp.noise_multiplier="
        f"{d.noise_multiplier!r} and sampling rate q={s.sampling_probability:.4g} "
        f"({s.num_units} {s.unit}s) reach epsilon {eps:.3f} at config.dp.delta="
        f"{d.delta!r} ({d.accountant}); the budget allows at most {most} steps: "
        f"lower {steps_field} or the batch, raise "
        "config.dp.noise_multiplier or config.dp.target_epsilon")
  return eps


class EpsilonWriter:
  """A metrics writer that adds `dp_epsilon` (after that step) to every row.

  The row dict is updated in place, so the loop's last metrics carry it too.
  """

  def __init__(self, writer, accountant: Accountant):
    self._writer = writer
    self._accountant = accountant

  def write(self, step: int, metrics: dict) -> None:
    metrics["dp_epsilon"] = self._accountant.epsilon(step)
    self._writer.write(step, metrics)

  def close(self) -> None:
    self._writer.close()
