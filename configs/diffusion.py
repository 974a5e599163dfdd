"""Sections for the diffusion model: model, diffusion, mask, train.

Defaults follow shared/docs/ALGORITHM.md Appendix A; departures are noted.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from dfgm_jax.models import unet

# model.dtype / model.attention_impl say how to run the network, not what it
# is; they have their own fields, so overrides leaves them out.
_RUNTIME_UNET_FIELDS = ("dtype", "attention_impl")
_PLACEHOLDER_TYPES = {"int": int, "float": float, "bool": bool, "str": str,
                      "tuple[int, ...]": tuple}


def unet_override_fields() -> ml_collections.ConfigDict:
  """One unset (None) field per UNetConfig field, typed for the command line.

  So `--config.model.overrides.dropout=0.0` works for every field, not only
  for those a config file happens to set; unset fields keep the preset's.
  """
  c = ml_collections.ConfigDict()
  for field in dataclasses.fields(unet.UNetConfig):
    if field.name not in _RUNTIME_UNET_FIELDS:
      c[field.name] = config_dict.placeholder(_PLACEHOLDER_TYPES[field.type])
  return c


def get_model_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = "small"  # tiny | small | full | large (dfgm_jax/models/unet.py)
  c.dtype = "float32"  # activations: float32 or bfloat16 (params stay float32)
  c.attention_impl = ""  # '' = XLA default, 'cudnn' on GPU, 'xla'
  # Any UNetConfig field (dfgm_jax/models/unet.py), e.g.
  # --config.model.overrides.dropout=0.0 or ...overrides.remat=True; None
  # keeps the preset's value.
  c.overrides = unet_override_fields()
  return c


def get_diffusion_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.schedule = "linear"  # linear | cosine
  c.num_steps = 1000
  c.beta_start = 1e-4
  c.beta_end = 0.02
  return c


def get_mask_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Radii given on the 240 px grid (about mm), scaled to the image size:
  # r_out 6 -> 3 px at 128 (ALGORITHM.md 3).
  c.r_out_240 = 6.0
  c.r_in_240 = 0.0
  # The region the model conditions on / regenerates: ring (dfgm), inner
  # (dfgm_inner, needs r_in_240 > 0), dilated (anomalydiffusion).
  c.region = "ring"
  return c


def get_train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.center = "CBICA"  # private center whose <center>_train split is used.
  c.reader = "grain"  # grain (no TF) | tf | synthetic
  c.batch_size = 32  # global, over all devices and processes.
  c.p_healthy = 0.5
  c.n_shot = 0  # private tumor slices a client may use; 0 = all.
  c.loss_region = "ring"  # ring | dilated | full (tumor examples)
  c.lr = 2e-4
  c.warmup_steps = 1000
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 0.0
  c.grad_clip = 1.0
  c.ema_decay = 0.999
  c.num_steps = 60_000
  c.steps_per_dispatch = 1  # >1: k updates in one lax.scan per dispatch.
  c.log_every = 100
  c.checkpoint_every = 1000
  c.checkpoints_to_keep = 3
  c.async_checkpoints = True
  c.tensorboard = True
  c.sampler_seed = 0
  c.aug_hflip = 0.5
  c.aug_rot_prob = 0.3
  c.aug_rot_deg = 10.0
  return c


def get_sampler_config() -> ml_collections.ConfigDict:
  """Blended sampler (dfgm_jax/diffusion/sampler.py, ALGORITHM.md 5)."""
  c = ml_collections.ConfigDict()
  c.kind = "ddim_blend"  # ddim_blend | ddpm_blend (1000 steps, paper-faithful)
  c.steps = 100  # DDIM grid size
  c.eta = 1.0
  c.jump_length = 5  # RePaint jumps; resamples = 1 disables them.
  c.resamples = 2  # S=100, jl=5, r=2: 290 transitions, 195 network calls.
  c.start_strength = 1.0
  c.adaptive_dilation = False
  c.final_paste = True
  c.batch_size = 64  # global synthesis batch
  c.unroll = 1  # lax.scan unroll of the sampling loop
  return c


def get_synthesis_config() -> ml_collections.ConfigDict:
  """Synthesis (ALGORITHM.md 2, 3, 8; launch/synthesize.py)."""
  c = ml_collections.ConfigDict()
  c.mode = "dfgm"  # dfgm | dfgm_inner | anomalydiffusion | cutpaste | real_only
  c.centers = ""  # comma-separated private centers; '' = train.center
  c.backend = "vgg16_imagenet"  # vgg16_imagenet | vgg16_random | pixels
  c.k = 2  # matches per tumor slice (Fig. 2: the two closest)
  c.mask_tumor = True  # ignore feature cells touched by the dilated tumor
  c.min_inside_brain = 0.95
  c.exclude_same_patient = True
  c.placement = "same"  # same | random_shift
  c.hflip = False
  # none | ring_mean: rescale the pasted tumor so its mean on the boundary
  # ring matches the healthy slice's (compose.match_intensity).
  c.intensity_match = "none"
  c.figure_rows = 4
  return c


def add_diffusion_sections(config: ml_collections.ConfigDict) -> None:
  config.model = get_model_config()
  config.diffusion = get_diffusion_config()
  config.mask = get_mask_config()
  config.train = get_train_config()
  config.sampler = get_sampler_config()
  config.synthesis = get_synthesis_config()
