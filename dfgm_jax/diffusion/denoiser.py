"""A diffusion model and its sampler: the one seam synthesis, figures and benchmarks use.

  d = Denoiser.load(model_dir, config, mesh)   # an export or a training workdir
  d = Denoiser.init(config, mesh)              # fresh weights (tests, benchmarks)
  generate = d.sampler(mode, seed, mesh)       # jit(params, x, tumor, h, index)
  images = generate(d.params, x, tumor, h, index)

A Denoiser carries what defines the model (its config's model, diffusion and
mask sections, data.image_size and data.modalities), its EMA weights, the
radii and regions it was trained with, and where it came from (step, sha256
of an export). G1, G2 and a local model are all "the same sampler, another
model folder". Loading never builds the optimizer: an export holds only the
EMA weights, and from a workdir's checkpoint only the `ema` item is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dfgm_jax import errors
from dfgm_jax import parallel
from dfgm_jax.diffusion import sampler as sampler_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.models import unet
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import modes


def model_config(config) -> "unet.UNetConfig":
  """UNetConfig from config.model (preset + overrides) and config.data."""
  m = config.model
  # Unset (None) override fields keep the preset's value.
  overrides = {k: v for k, v in (m.get("overrides", {}) or {}).items()
               if v is not None}
  overrides.setdefault("image_size", config.data.image_size)
  overrides.setdefault("in_channels", len(config.data.modalities))
  overrides["dtype"] = m.dtype
  overrides["attention_impl"] = m.attention_impl or None
  return unet.get_preset(m.preset, **overrides)


def schedule_from(config) -> schedule_lib.Schedule:
  """The noise schedule of config.diffusion."""
  d = config.diffusion
  return schedule_lib.make_schedule(d.schedule, d.num_steps, d.beta_start, d.beta_end)


def sampler_config_from(config):
  """SamplerConfig from config.sampler (fields it does not know are ignored)."""
  fields = {f.name for f in dataclasses.fields(sampler_lib.SamplerConfig)}
  return sampler_lib.SamplerConfig(**{k: v for k, v in config.sampler.to_dict().items()
                                      if k in fields})


def radii(config) -> tuple[int, int]:
  """(r_out, r_in) in pixels: config.mask's radii at 240 px scaled to data.image_size."""
  size = config.data.image_size
  return (masks.radius_for_size(config.mask.r_out_240, size),
          masks.radius_for_size(config.mask.r_in_240, size))


def make_sampler(mode: str, eps_fn_factory: Callable | None, sched: schedule_lib.Schedule,
                 scfg: sampler_lib.SamplerConfig, r_out: int, r_in: int, seed: int,
                 mesh: jax.sharding.Mesh | None = None) -> Callable:
  """jit(params, x, tumor, h, index) -> images: modes.synthesize_batch, compiled once.

  The batch (x, tumor, h, index) is sharded over the mesh's `data` axis and
  the parameters replicated; without a mesh, plain jit. eps_fn_factory(params)
  returns the network's eps function (None for modes without diffusion).
  Prefer Denoiser.sampler, which fills everything but the mode from the model.
  """
  key_seed = int(seed)

  def generate(params, x, tumor, h, index):
    eps_fn = eps_fn_factory(params) if eps_fn_factory is not None else None
    return modes.synthesize_batch(mode, eps_fn, sched, scfg, x, tumor, h,
                                  jax.random.key(key_seed), index, r_out, r_in)

  if mesh is None:
    return jax.jit(generate)
  data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)
  return jax.jit(generate, in_shardings=(rep, data, data, data, data), out_shardings=data)


# A region the loss was trained on covers the generated regions listed here.
# 'ring' covers 'inner' too: ALGORITHM.md 8 trains dfgm_inner's model on "the
# same ring" (there is no inner loss region).
_LOSS_COVERS = {"ring": ("ring", "inner"), "dilated": ("ring", "inner", "dilated"),
                "full": ("ring", "inner", "dilated")}


@dataclasses.dataclass
class Denoiser:
  """A denoiser network with its EMA weights and the settings it was trained with.

  Attributes:
    config: a ConfigDict whose model, diffusion and mask sections and
      data.image_size / data.modalities are the model's; the rest (sampler,
      synthesis, runtime fields model.dtype / attention_impl) the caller's.
    graphdef, rest: nnx.split's static graph and non-parameter state.
    params: the EMA weights (an nnx.State), replicated over the mesh when
      one was given.
    step: training step of the weights (0 for fresh ones).
    model_id: sha256 of an export's params.npz; None for a workdir or fresh
      weights.
    loss_region: the region the model was trained to regenerate
      (config.train.loss_region of its run) when known, else None (exports
      do not carry it).
    source: where the weights came from, for messages.
  """

  config: ml_collections.ConfigDict
  graphdef: Any
  rest: Any
  params: Any
  step: int = 0
  model_id: str | None = None
  loss_region: str | None = None
  source: str = "fresh weights"

  # --- What the model is ---

  @property
  def schedule(self) -> schedule_lib.Schedule:
    return schedule_from(self.config)

  @property
  def sampler_config(self) -> sampler_lib.SamplerConfig:
    return sampler_config_from(self.config)

  @property
  def r_out(self) -> int:
    """Outer ring radius in pixels at the model's image size."""
    return radii(self.config)[0]

  @property
  def r_in(self) -> int:
    """Inner ring radius in pixels (dfgm_inner) at the model's image size."""
    return radii(self.config)[1]

  @property
  def region(self) -> str:
    """The region the network is conditioned on (config.mask.region)."""
    return self.config.mask.region

  @property
  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.params))

  # --- Construction ---

  @classmethod
  def init(cls, config, mesh: jax.sharding.Mesh | None = None,
           seed: int | None = None) -> "Denoiser":
    """Fresh weights: the values train.diffusion.init_state(config, seed) starts from."""
    seed = config.seed if seed is None else seed
    model = unet.create_model(model_config(config), jax.random.key(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.asarray, params)
    train = config.get("train") or {}
    return cls(ml_collections.ConfigDict(config.to_dict()), graphdef, rest,
               _place(params, mesh), loss_region=train.get("loss_region"))

  @classmethod
  def load(cls, model_dir: str, config, mesh: jax.sharding.Mesh | None = None
           ) -> "Denoiser":
    """The EMA weights of an export (model.json) or a training workdir (checkpoints/).

    The model's defining config sections replace `config`'s (logged when they
    differ). A workdir's newest checkpoint that is unreadable is skipped with
    a warning (the previous one is used); one that does not fit the network
    its own config describes is refused (that is not corruption).

    Raises:
      model_io.ModelError: not a model folder, no readable checkpoint, a bad
        export (format, checksum) or weights that do not fit the network.
    """
    from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
    if model_io.is_export(model_dir):
      record, arrays = model_io.read_export(model_dir)
      config = model_io.apply_model_config(config, record["config"], model_dir)
      graphdef, abstract, rest = _network(config)
      params = model_io.fill(abstract, arrays, os.path.join(model_dir, model_io.PARAMS))
      train = record["config"].get("train") or {}
      return cls(config, graphdef, rest, _place(params, mesh), step=int(record["step"]),
                 model_id=record["params_sha256"], loss_region=train.get("loss_region"),
                 source=str(model_dir))
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    if not epath.Path(ckpt_dir).is_dir():
      raise model_io.ModelError(
          f"{model_dir}: neither an exported model ({model_io.MODEL_JSON}) nor a "
          "training workdir (checkpoints/)")
    return _load_workdir(cls, ckpt_dir, config, mesh)

  # --- Sampling ---

  def eps_fn(self, params) -> Callable:
    """(x_t, t, class_id, ring, tumor) -> eps of the network with `params`."""
    graphdef, rest = self.graphdef, self.rest
    return lambda x, t, c, r, m: nnx.merge(graphdef, params, rest)(x, t, c, r, m)

  def check_mode(self, mode: str) -> None:
    """Refuses a synthesis mode whose generated region the model was not trained for.

    The sampler passes the mode's generated region to the network as its
    conditioning mask (ALGORITHM.md 8), so it must be the region the model
    was conditioned on in training (config.mask.region); and, when the
    model's loss region is known, the loss must have covered it (an
    anomalydiffusion model is trained on the dilated region).

    Raises:
      errors.ConfigError: naming the mode, the model's regions and the fix.
    """
    if not modes.uses_diffusion(mode):  # cutpaste: the network is not used.
      return
    want = modes.generated_region(mode)
    have = _effective_region(self.region, self.r_in)
    if _effective_region(want, self.r_in) != have:
      fits = [m for m in modes.MODES if modes.uses_diffusion(m) and
              _effective_region(modes.generated_region(m), self.r_in) == have]
      raise errors.ConfigError(
          f"config.synthesis.mode={mode}: it generates the {want!r} region, but the "
          f"model ({self.source}) was trained conditioned on mask.region="
          f"{self.region!r}, a mask it would never have seen; use mode "
          f"{' or '.join(fits) or '(none)'} with this model, or train one with "
          f"--config.mask.region={want}")
    if self.loss_region is not None and want not in _LOSS_COVERS.get(self.loss_region, ()):
      raise errors.ConfigError(
          f"config.synthesis.mode={mode}: it generates the {want!r} region, but the "
          f"model ({self.source}) was trained to regenerate only train.loss_region="
          f"{self.loss_region!r}; train its own model with "
          f"--config.train.loss_region={want} (ALGORITHM.md 8)")

  def sampler(self, mode: str, seed: int, mesh: jax.sharding.Mesh | None = None, *,
              check: bool = True) -> Callable:
    """THE jitted sampler: f(params, x, tumor, h, index) -> images (B,S,S,C).

    modes.synthesize_batch with this model's schedule, sampler settings and
    radii; noise from jax.random.key(seed) folded with each example's global
    index. Batch sharded over the mesh's `data` axis, params replicated.
    Works for cutpaste (params unused).

    Args:
      mode: a synthesis mode (modes.MODES except real_only).
      seed: the run's seed.
      mesh: the data-parallel mesh (None: plain jit).
      check: refuse a mode the model was not trained for (check_mode); False
        only for illustrations that show other modes side by side.
    """
    if check:
      self.check_mode(mode)
    factory = self.eps_fn if modes.uses_diffusion(mode) else None
    return make_sampler(mode, factory, self.schedule, self.sampler_config, self.r_out,
                        self.r_in, seed, mesh)


def _effective_region(region: str, r_in: int) -> str:
  # 'inner' with r_in = 0 is the ring (masks.region).
  return "ring" if region == "inner" and r_in == 0 else region


def _place(params, mesh):
  """Device arrays, replicated over `mesh` when one is given."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, params)
  return jax.device_put(params, parallel.replicated(mesh))


def _network(config):
  """(graphdef, abstract params, rest) of config's UNet, without computing weights."""
  cfg = model_config(config)
  graphdef, params, rest = nnx.split(unet.abstract_model(cfg), nnx.Param, ...)
  if jax.tree.leaves(rest):  # non-parameter state needs real values.
    graphdef, _, rest = nnx.split(unet.create_model(cfg, 0), nnx.Param, ...)
  return graphdef, params, rest


def _load_workdir(cls, ckpt_dir: str, config, mesh) -> Denoiser:
  """The newest readable checkpoint's `ema` item (orbax partial restore)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from dfgm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpt = ckpt_lib.Checkpointer(ckpt_dir)
  try:
    steps, directory = ckpt.all_steps(), epath.Path(ckpt.directory)
  finally:
    ckpt.close()
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return _newest_ema(cls, handler, directory, steps, ckpt_dir, config, mesh)
  finally:
    handler.close()


def _newest_ema(cls, handler, directory, steps, ckpt_dir: str, config, mesh) -> Denoiser:
  """Tries the steps newest first: corrupt ones are skipped, a misfit is refused."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  unreadable = []
  for step in reversed(steps):
    # orbax's layout: <dir>/<step>/{state,meta}, one folder per item.
    step_dir = directory / str(step)
    try:
      meta = ocp.JsonCheckpointHandler().restore(step_dir / "meta")
      stored = handler.metadata(step_dir / "state")
      stored = getattr(stored, "tree", stored)["ema"]
    except Exception as e:  # orbax/tensorstore raise many types.
      _skip(unreadable, step, ckpt_dir, e)
      continue
    saved = meta["config"]
    model_config_ = model_io.apply_model_config(
        config, model_io.defining_sections(saved), ckpt_dir)
    graphdef, abstract, rest = _network(model_config_)
    _check_fits(abstract, stored, f"{step_dir}", model_io)
    rep = (parallel.replicated(mesh) if mesh is not None
           else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    target = {"ema": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)}
    try:
      # Only the `ema` item is read: no optimizer state, no template for it.
      restored = handler.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
    except Exception as e:  # orbax/tensorstore raise many types.
      _skip(unreadable, step, ckpt_dir, e)
      continue
    train = saved.get("train") or {}
    return cls(model_config_, graphdef, rest, restored["ema"], step=int(step),
               loss_region=train.get("loss_region"), source=str(ckpt_dir))
  raise model_io.ModelError(
      f"{ckpt_dir}: no readable checkpoint" +
      (f" (steps {unreadable} are corrupt or incomplete)" if unreadable else ""))


def _skip(unreadable: list, step: int, ckpt_dir: str, e: Exception) -> None:
  unreadable.append(step)
  logging.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to "
                  "the previous one", step, ckpt_dir, type(e).__name__, str(e)[:300])


def _check_fits(abstract, stored, source: str, model_io) -> None:
  """Refuses stored EMA weights whose names or shapes differ from the network's.

  A mismatch is not corruption: the checkpoint is readable but was written
  for another network than the one its own config now builds (another code
  version), so it is refused rather than skipped.
  """
  want = {model_io.leaf_name(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  have = {}
  for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]:
    name = model_io.leaf_name(p)
    # Metadata trees keep nnx.Variable's payload as a dict key 'value'.
    have[name[:-len("/value")] if name.endswith("/value") else name] = tuple(x.shape)
  if want == have:
    return
  missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = [f"{k}: stored {have[k]}, network {want[k]}" for k in sorted(want)
            if k in have and have[k] != want[k]]
  raise model_io.ModelError(
      f"{source}: the checkpoint is readable but does not fit the network its own "
      f"config describes (missing {missing[:5]}, unexpected {unexpected[:5]}, "
      f"shapes {shapes[:5]}); it was written by another version of the model code")
