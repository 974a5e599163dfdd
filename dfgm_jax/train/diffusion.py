"""Training the few-shot diffusion model: state, update step, run identity, loop.

Banner sections, big_vision style: optimizer, state, update step, run
identity, loop. The diffusion specifics live here; the loop's pieces
(workdir claim, restore, AOT compile, run k steps with metrics, checkpoints
and preemption) are train/loop.py's, shared with the other trainers. The
step is one jitted function of (state, batches) with the state donated; the
batch is sharded over the mesh's `data` axis and the parameters replicated,
so the same code runs on 1 CPU, 8 fake CPU devices, one GPU or a multi-host
pod.

With config.dp.enabled the step is DP-SGD on the private slices
(train/dp.py): the batches then carry the private part separately
(dp_image, dp_mask, dp_valid; dp.PoissonSampler), the gradient is
dp.private_grads, and train() checks the privacy budget and logs epsilon.
With it off (the default) the step is the same program as without the
option.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding

from dfgm_jax import checkpoint as ckpt_lib
from dfgm_jax import config_checks
from dfgm_jax import errors
from dfgm_jax import parallel
from dfgm_jax.diffusion import denoiser
from dfgm_jax.diffusion import loss as loss_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.models import unet
from dfgm_jax.synthesis import masks
from dfgm_jax.train import augment as augment_lib
from dfgm_jax.train import dp as dp_lib
from dfgm_jax.train import loop
from dfgm_jax.train import metrics as metrics_lib

# --- Model and optimizer -------------------------------------------------------


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW with linear warm-up then constant lr, global-norm clipping."""
  lr = optax.warmup_constant_schedule(0.0, t.lr, max(t.warmup_steps, 1))
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))


def learning_rate(t, step):
  return optax.warmup_constant_schedule(0.0, t.lr, max(t.warmup_steps, 1))(step)


def ema_decay(max_decay: float, step):
  """min(max_decay, (1 + n) / (10 + n)): fast early, max_decay later."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


# --- State ---------------------------------------------------------------------


def init_state(config, rng_seed: int | None = None):
  """(graphdef, rest, state): state = {step, params, ema, opt_state, key}."""
  seed = config.seed if rng_seed is None else rng_seed
  model = unet.create_model(denoiser.model_config(config), jax.random.key(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(config.train)
  params = jax.tree.map(jnp.asarray, params)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "ema": jax.tree.map(jnp.copy, params),
      "opt_state": tx.init(params),
      "key": jax.random.key_data(jax.random.key(seed + 1)),
  }
  return graphdef, rest, state


# --- Update step ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The static parts of the update step (hashable, closed over by jit)."""

  r_out: int
  r_in: int
  cond_region: str
  loss_region: str
  p_flip: float
  p_rot: float
  rot_deg: float


def step_settings(config) -> StepSettings:
  s = config.data.image_size
  t = config.train
  return StepSettings(
      r_out=masks.radius_for_size(config.mask.r_out_240, s),
      r_in=masks.radius_for_size(config.mask.r_in_240, s),
      cond_region=config.mask.region, loss_region=t.loss_region,
      p_flip=t.aug_hflip, p_rot=t.aug_rot_prob, rot_deg=t.aug_rot_deg)


def dp_enabled(config) -> bool:
  """config.dp.enabled (configs without a dp section train without DP)."""
  return "dp" in config and bool(config.dp.enabled)


def make_train_step(graphdef, rest, config) -> Callable:
  """Returns train_step(state, batches) -> (state, metrics).

  `batches` holds k stacked steps (leading axis k, then the global batch):
  image (k,B,S,S,C) float32, mask (k,B,S,S,1), is_tumor (k,B) int32. The k
  steps run in one lax.scan: one dispatch, k updates. With config.dp.enabled
  they are the public part, and dp_image (k,U*m,S,S,C), dp_mask, dp_valid
  (k,U*m) the private one (dp.PoissonSampler); metrics gain dp_units,
  dp_clipped_frac and dp_unit_grad_norm.
  """
  settings = step_settings(config)
  sched = denoiser.schedule_from(config)
  tx = make_optimizer(config.train)
  t_cfg = config.train
  num_t = config.diffusion.num_steps
  dp_cfg = config.dp if dp_enabled(config) else None

  def loss_fn(params, batch, key):
    k_aug, k_t, k_noise, k_drop = jax.random.split(key, 4)
    is_tumor = batch["is_tumor"]
    tumor = is_tumor[:, None, None, None].astype(jnp.float32)
    x0, mask = augment_lib.augment(k_aug, batch["image"], batch["mask"] * tumor,
                                   is_tumor, settings.p_flip, settings.p_rot,
                                   settings.rot_deg)
    cond = masks.region(mask, settings.cond_region, settings.r_out, settings.r_in)
    # Tumor examples learn only in their ring (or the configured region);
    # healthy ones everywhere (ALGORITHM.md 4.5).
    weight = tumor * masks.region(mask, settings.loss_region, settings.r_out,
                                  settings.r_in) + (1.0 - tumor)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, num_t)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = schedule_lib.q_sample(sched, x0, t, noise)
    model = nnx.merge(graphdef, params, rest)
    eps_hat = model(x_t, t, is_tumor, cond, mask, train=True, dropout_key=k_drop)
    per_example = loss_lib.masked_mse(noise, eps_hat, weight)
    return jnp.mean(per_example), per_example

  def apply(state, grads):
    """The optimizer and EMA update of one step."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay(t_cfg.ema_decay, state["step"])
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                       state["ema"], params)
    return dict(state, step=state["step"] + 1, params=params, ema=ema,
                opt_state=opt_state)

  def dp_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
    public = {k: batch[k] for k in ("image", "mask", "is_tumor")}
    private = {"image": batch["dp_image"], "mask": batch["dp_mask"],
               "is_tumor": jnp.ones_like(batch["dp_valid"]),
               "valid": batch["dp_valid"]}
    grads, aux = dp_lib.private_grads(
        lambda p, b, k: loss_fn(p, b, k)[1], state["params"], public, private,
        key, clip_norm=dp_cfg.clip_norm,
        noise_multiplier=dp_cfg.noise_multiplier,
        slices_per_unit=(dp_cfg.slices_per_patient
                         if dp_cfg.unit == "patient" else 1),
        expected_batch=t_cfg.batch_size)
    metrics = {"loss": aux["loss_sum"] / jnp.maximum(aux["examples"], 1.0),
               "grad_norm": optax.global_norm(grads),
               "lr": learning_rate(t_cfg, state["step"]),
               "dp_units": aux["units"],
               "dp_clipped_frac": aux["clipped_frac"],
               "dp_unit_grad_norm": aux["unit_grad_norm"]}
    return apply(state, grads), metrics

  def one_step(state, batch):
    if dp_cfg is not None:
      return dp_step(state, batch)
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], batch, key)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": learning_rate(t_cfg, state["step"])}
    return apply(state, grads), metrics

  def train_step(state, batches):
    if batches["image"].shape[0] == 1:
      # No loop for one step: XLA:CPU runs convolutions inside a while-loop
      # body about 5x slower than at top level (measured, tiny preset).
      return one_step(state, jax.tree.map(lambda x: x[0], batches))
    state, metrics = jax.lax.scan(one_step, state, batches)
    return state, jax.tree.map(jnp.mean, metrics)

  return train_step


# --- Run identity ----------------------------------------------------------------

# What defines a diffusion training run: a rerun on the same workdir with other
# values is another run (errors.RunMismatch). Within these sections, the
# fields in _FREE_FIELDS may change between reruns of one run: how long to
# train, how often to log and save, how to run and read, not what is learnt.
_RUN_SECTIONS = ("seed", "model", "diffusion", "mask", "data", "train", "dp")
_FREE_FIELDS = {
    "model": ("attention_impl",),
    "data": ("formats", "num_shards_hint", "on_error"),
    "train": ("num_steps", "steps_per_dispatch", "log_every",
              "checkpoint_every", "checkpoints_to_keep", "async_checkpoints",
              "tensorboard"),
    # The budget and how epsilon is reported, not what is learnt.
    "dp": ("delta", "target_epsilon", "accountant"),
}


# The identity's record of the training data, when the sampler gives one.
TRAINING_DATA = "training_data"


def run_identity(config: dict) -> dict:
  """The defining fields of a config (as JSON, e.g. a checkpoint's meta)."""
  identity = loop.identity_of(config, _RUN_SECTIONS, _FREE_FIELDS)
  dp = identity.get("dp")
  if isinstance(dp, dict) and not dp.get("enabled", False):
    # Training without DP is the run it was before the dp section existed.
    del identity["dp"]
  train = identity.get("train")
  if isinstance(train, dict) and "reader" in train:
    # grain and tf read the same slices; the synthetic reader is other data.
    train["reader"] = "synthetic" if train["reader"] == "synthetic" else "slices"
  return identity


# --- Loop ----------------------------------------------------------------------


def batch_sharding(mesh) -> NamedSharding:
  """(k, B, ...) stacked batches: the batch axis (1) over `data`."""
  return loop.batch_sharding(mesh)


def _validate(config):
  t = config.train
  k = t.steps_per_dispatch
  for name in ("num_steps", "checkpoint_every", "log_every"):
    if getattr(t, name) % k:
      raise errors.ConfigError(
          f"config.train.{name}={getattr(t, name)}: must be a multiple of "
          f"config.train.steps_per_dispatch={k}")
  if t.batch_size % jax.device_count():
    raise errors.ConfigError(
        f"config.train.batch_size={t.batch_size}: must be a multiple of the "
        f"{jax.device_count()} devices")
  if dp_enabled(config) and dp_lib.public_per_step(config) % jax.device_count():
    raise errors.ConfigError(
        f"config.train.p_healthy={t.p_healthy!r}: with config.dp.enabled the "
        f"round(batch_size * p_healthy) = {dp_lib.public_per_step(config)} "
        f"public slices per step must be a multiple of the "
        f"{jax.device_count()} devices")


def _dp_sampling(config, batch_fn, dp_sampling):
  """The DP sampler's plan: given, or the attribute of batch_fn's sampler."""
  if not dp_enabled(config):
    return None
  sampling = dp_sampling or getattr(getattr(batch_fn, "__self__", None),
                                    "dp_sampling", None)
  if sampling is None:
    raise errors.ConfigError(
        "config.dp.enabled=True: the batches must come from a DP sampler "
        "(dfgm_jax.train.dp.make_sampler; launch/train_data.make_sampler "
        "builds one), or pass dp_sampling=")
  return sampling


def train(config, workdir: str, batch_fn: Callable[[int], dict], *,
          mesh=None, progress: bool = True, stop_at: int | None = None,
          overwrite: bool = False,
          dp_sampling: dp_lib.Sampling | None = None) -> dict:
  """Trains (or resumes) the diffusion model in `workdir`.

  Args:
    config: the full config (model, diffusion, mask, train, data).
    workdir: checkpoints in workdir/checkpoints, metrics.jsonl, tensorboard/,
      run.json (the run's defining config, see run_identity).
    batch_fn: step -> this process's batch for that step (numpy dict: image,
      mask, is_tumor), batch_size / process_count examples. Pure in the step,
      so a resumed run replays exactly.
    mesh: defaults to all devices on a `data` axis.
    progress: show a progress bar (process 0).
    stop_at: stop (with a checkpoint) after this step, as if preempted; for
      tests and staged runs. None runs to train.num_steps.
    overwrite: delete another run's checkpoints, metrics and events in
      `workdir` instead of refusing it.
    dp_sampling: with config.dp.enabled, the DP sampler's plan; by default
      `batch_fn.__self__.dp_sampling` (batch_fn = dp.PoissonSampler.batch).

  Returns:
    dict with step, state (on device), compile_s, preempted, metrics (last;
    with DP, dp_epsilon), and with DP dp_epsilon and dp_sampling.

  Raises:
    errors.ConfigError: a training setting out of range, or (DP) the
      configured steps spend more than config.dp.target_epsilon (before any
      compile or I/O).
    errors.RunMismatch: `workdir` holds a run with another defining config.
  """
  config_checks.validate(config)
  _validate(config)
  t = config.train
  k = t.steps_per_dispatch
  sampling = _dp_sampling(config, batch_fn, dp_sampling)
  accountant = None
  if sampling is not None:
    accountant = dp_lib.accountant_for(config, sampling)
    eps = dp_lib.check_budget(config, accountant, t.num_steps, multiple=k)
    logging.info("DP-SGD: %s; epsilon %.3f at delta %g after %d steps (%s)",
                 sampling, eps, config.dp.delta, t.num_steps,
                 config.dp.accountant)
  mesh = mesh or parallel.make_mesh()
  config_json = json.loads(config.to_json_best_effort())
  identity = run_identity(config_json)
  # What the batches are drawn from (launch/train_data.py's samplers say it):
  # a finished run continued on other slices is another run.
  data = getattr(getattr(batch_fn, "__self__", None), "data_fingerprint", None)
  if data is not None:
    identity[TRAINING_DATA] = data
  loop.claim_workdir(workdir, identity, identity_fn=run_identity,
                     what="a diffusion training run", overwrite=overwrite,
                     recorded_since=(TRAINING_DATA,))
  graphdef, rest, state = init_state(config)
  state = jax.device_put(state, parallel.replicated(mesh))
  checkpointer = loop.make_checkpointer(workdir, t)
  writer = watcher = None
  try:
    step, state = loop.restore(checkpointer, state)
    # Compile ahead of time, so the compile time is measured and logged.
    local = loop.stack_batches(batch_fn, step, k)
    compiled, compile_s = loop.compile_step(
        make_train_step(graphdef, rest, config), state,
        loop.global_batches(local, mesh), mesh, steps_per_dispatch=k)
    writer = metrics_lib.MetricsWriter(workdir, enabled=parallel.is_main(),
                                       tensorboard=t.tensorboard,
                                       resume_step=step)
    if accountant is not None:
      writer = dp_lib.EpsilonWriter(writer, accountant)
    watcher = ckpt_lib.PreemptionWatcher()
    end = t.num_steps if stop_at is None else min(stop_at, t.num_steps)
    result = loop.run_steps(
        compiled, state, batch_fn, mesh, start=step, end=end,
        batch_size=t.batch_size, steps_per_dispatch=k, log_every=t.log_every,
        checkpoint_every=t.checkpoint_every, checkpointer=checkpointer,
        meta={"config": config_json, "sampler": "step-indexed"},
        writer=writer, watcher=watcher, progress=progress, first_batches=local)
  finally:
    loop.close_all(checkpointer, writer, watcher)
  if result.preempted:
    logging.warning("stopped at step %d on a preemption signal; checkpoint "
                    "saved, rerun with the same --workdir to resume", result.step)
  out = {"step": result.step, "state": result.state, "compile_s": compile_s,
         "preempted": result.preempted, "metrics": result.metrics,
         "graphdef": graphdef, "rest": rest}
  if accountant is not None:
    out.update(dp_epsilon=accountant.epsilon(result.step),
               dp_sampling=sampling.to_dict())
    logging.info("DP-SGD: epsilon %.3f at delta %g after %d steps",
                 out["dp_epsilon"], config.dp.delta, result.step)
  return out
