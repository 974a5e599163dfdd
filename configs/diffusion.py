"""Sections for the diffusion model: model, diffusion, mask, train, dp.

Defaults follow shared/docs/ALGORITHM.md Appendix A; departures are noted.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from dfgm_jax.models import unet_config

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
  for field in dataclasses.fields(unet_config.UNetConfig):
    if field.name not in _RUNTIME_UNET_FIELDS:
      c[field.name] = config_dict.placeholder(_PLACEHOLDER_TYPES[field.type])
  return c


def get_model_config() -> ml_collections.ConfigDict:
  """The denoiser network (dfgm_jax/models/unet.py)."""
  c = ml_collections.ConfigDict()
  # Network size: tiny | small | full | large | peer (UNetConfig presets).
  c.preset = "small"
  # Activations: float32 or bfloat16 (parameters stay float32).
  c.dtype = "float32"
  # Attention kernel: '' = XLA's default, 'xla', or 'cudnn' (GPU, bfloat16).
  c.attention_impl = ""
  # Any UNetConfig field (dfgm_jax/models/unet.py), e.g.
  # --config.model.overrides.dropout=0.0 or ...overrides.remat=True; None
  # keeps the preset's value.
  c.overrides = unet_override_fields()
  return c


def get_diffusion_config() -> ml_collections.ConfigDict:
  """The forward noising process (dfgm_jax/diffusion/schedule.py)."""
  c = ml_collections.ConfigDict()
  # Noise schedule: linear | cosine.
  c.schedule = "linear"
  # Diffusion steps T.
  c.num_steps = 1000
  # Linear schedule's first and last beta (0 < beta_start < beta_end < 1).
  c.beta_start = 1e-4
  c.beta_end = 0.02
  return c


def get_mask_config() -> ml_collections.ConfigDict:
  """The boundary ring around a tumor (dfgm_jax/synthesis/masks.py)."""
  c = ml_collections.ConfigDict()
  # Radii given on the 240 px grid (about mm), scaled to the image size:
  # r_out 6 -> 3 px at 128 (ALGORITHM.md 3). r_out dilates the tumor mask.
  c.r_out_240 = 6.0
  # Width of the band inside the tumor that 'inner' regenerates too.
  c.r_in_240 = 0.0
  # The region the model conditions on / regenerates: ring (dfgm), inner
  # (dfgm_inner, needs r_in_240 > 0), dilated (anomalydiffusion), full.
  c.region = "ring"
  return c


def get_train_config() -> ml_collections.ConfigDict:
  """Training the denoiser (dfgm_jax/train/diffusion.py)."""
  c = ml_collections.ConfigDict()
  # Private center whose <center>_train split is used.
  c.center = "CBICA"
  # Batch reader: grain (no TF) | tf | synthetic (random, for benchmarks).
  c.reader = "grain"
  # Global batch, over all devices and processes.
  c.batch_size = 32
  # Probability that a batch slot holds a healthy (public) slice, in [0, 1].
  c.p_healthy = 0.5
  # Private tumor slices a client may use (few-shot); 0 = all.
  c.n_shot = 0
  # Where tumor examples are trained: ring | inner | dilated | full.
  c.loss_region = "ring"
  # AdamW: learning rate (constant after a linear warm-up of warmup_steps).
  c.lr = 2e-4
  c.warmup_steps = 1000
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 0.0
  # Global gradient-norm clip.
  c.grad_clip = 1.0
  # Largest EMA decay of the weights synthesis uses.
  c.ema_decay = 0.999
  # Optimizer steps in all.
  c.num_steps = 60_000
  # >1: k updates in one lax.scan per dispatch.
  c.steps_per_dispatch = 1
  # Steps between metric rows (metrics.jsonl, TensorBoard).
  c.log_every = 100
  # Steps between checkpoints, and how many are kept.
  c.checkpoint_every = 1000
  c.checkpoints_to_keep = 3
  # Save checkpoints in the background while training goes on.
  c.async_checkpoints = True
  # Also write TensorBoard event files.
  c.tensorboard = True
  # Seed of the batch sampler and of the n_shot subset.
  c.sampler_seed = 0
  # Augmentation: horizontal-flip and rotation probabilities, and the
  # largest rotation in degrees.
  c.aug_hflip = 0.5
  c.aug_rot_prob = 0.3
  c.aug_rot_deg = 10.0
  return c


def get_dp_config() -> ml_collections.ConfigDict:
  """DP-SGD for the private tumor slices (dfgm_jax/train/dp.py, ALGORITHM.md 9).

  Off by default. Public healthy slices keep their ordinary gradient; the
  private part of each batch is Poisson-sampled by unit (expected size
  batch_size * (1 - p_healthy) examples), clipped per unit and noised.
  Needs the `dp` extra (pip install -e ".[dp]": dp-accounting).
  """
  c = ml_collections.ConfigDict()
  # DP-SGD on the private slices (train/dp.py); False trains as before.
  c.enabled = False
  # Unit of privacy: patient (sample patients, clip the sum of a patient's
  # slice gradients) | example (each slice its own unit).
  c.unit = "patient"
  # Slices of a drawn patient in the step (drawn with replacement); the
  # clipped patient gradient sums them. Ignored for unit='example'.
  c.slices_per_patient = 1
  # Gaussian noise std = noise_multiplier * clip_norm on the clipped sum.
  c.noise_multiplier = 1.0
  # L2 bound of one unit's gradient (ALGORITHM.md 9: start with C = 1).
  c.clip_norm = 1.0
  # The delta at which epsilon is reported.
  c.delta = 1e-5
  # Privacy budget: a run whose num_steps would reach more is refused;
  # 0 = no budget (epsilon is still reported).
  c.target_epsilon = 0.0
  # rdp (RdpAccountant, fast) | pld (PLD, tighter, accounts for the
  # sampler's truncation exactly; about 1 s per logged row).
  c.accountant = "rdp"
  return c


def get_sampler_config() -> ml_collections.ConfigDict:
  """Blended sampler (dfgm_jax/diffusion/sampler.py, ALGORITHM.md 5)."""
  c = ml_collections.ConfigDict()
  # ddim_blend | ddpm_blend (every one of the T steps, paper-faithful).
  c.kind = "ddim_blend"
  # DDIM grid size S (at most diffusion.num_steps).
  c.steps = 100
  # DDIM stochasticity in [0, 1] (1 reproduces DDPM on the grid).
  c.eta = 1.0
  # RePaint jumps of jump_length grid steps, each interval visited
  # `resamples` times; resamples = 1 disables them.
  # S=100, jl=5, r=2: 290 transitions, 195 network calls.
  c.jump_length = 5
  c.resamples = 2
  # In (0, 1]; < 1 starts from the composite noised part-way (SDEdit-style).
  c.start_strength = 1.0
  # Grow the generated region early and shrink it to the ring.
  c.adaptive_dilation = False
  # The exact paste outside the ring at the end (keep True).
  c.final_paste = True
  # Global synthesis batch.
  c.batch_size = 64
  # lax.scan unroll of the sampling loop (compile time grows with it).
  c.unroll = 1
  return c


def get_synthesis_config() -> ml_collections.ConfigDict:
  """Synthesis (ALGORITHM.md 2, 3, 8; dfgm_jax/synthesis/)."""
  c = ml_collections.ConfigDict()
  # dfgm | dfgm_inner | anomalydiffusion | cutpaste | real_only.
  c.mode = "dfgm"
  # Comma-separated private centers; '' = train.center.
  c.centers = ""
  # Matching features: vgg16_imagenet | vgg16_random | pixels.
  c.backend = "vgg16_imagenet"
  # Matches per tumor slice (Fig. 2: the two closest).
  c.k = 2
  # Ignore feature cells touched by the dilated tumor.
  c.mask_tumor = True
  # Share of the tumor that must lie inside a healthy slice's brain.
  c.min_inside_brain = 0.95
  # Never pair a tumor with a healthy slice of the same patient.
  c.exclude_same_patient = True
  # Tumor position: same (as in its slice) | random_shift (inside the brain).
  c.placement = "same"
  # Mirror the tumor on a coin flip.
  c.hflip = False
  # none | ring_mean: rescale the pasted tumor so its mean on the boundary
  # ring matches the healthy slice's (compose.match_intensity).
  c.intensity_match = "none"
  # What the shareable set's provenance names (synthesis/pipeline.py
  # PROVENANCES): slice = one salted pseudonym per source slice and no slice
  # index, so a patient's slices cannot be grouped into a stack; patient = the
  # patient's salted pseudonym and the raw slice index (groups them: only for
  # research that needs patient-level splits of the synthetic set).
  c.provenance = "slice"
  # Rows of the comparison figure.
  c.figure_rows = 4
  return c


def add_diffusion_sections(config: ml_collections.ConfigDict) -> None:
  config.model = get_model_config()
  config.diffusion = get_diffusion_config()
  config.mask = get_mask_config()
  config.train = get_train_config()
  config.dp = get_dp_config()
  config.sampler = get_sampler_config()
  config.synthesis = get_synthesis_config()
