"""Checks every config value before any compile or I/O (JAX-free).

A bad value (a batch size of 0, `checkpoint_every=0`, an unknown modality)
used to surface minutes later as a NaN loss, a ZeroDivisionError after a
compile, or a bare KeyError; here it is refused at once with one line that
names the field, the value and what is allowed:

  config.train.batch_size=0: must be a positive integer

`validate(config)` checks every section the config has (a ConfigDict or a
plain dict of sections) and ignores fields it does not know; the data layer,
which receives `config.data` as a dict, calls `validate_data(cfg)`. Every
stage's `run()` calls one of them first; launch/common.py also runs
`validate` right after flag parsing, so every binary refuses a bad config
before it starts.

The module must not import JAX (the data layer imports it), so the allowed
names below are copies of the library's, except the network's, which come
from the JAX-free unet_config; tests/test_config_checks.py checks that the
copies stay equal.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

from dfgm_jax import errors
from dfgm_jax.models import unet_config as unet_config_lib

# Copies of the library's allowed values (tests/test_config_checks.py keeps
# them equal to the originals named in each comment).
# dfgm_jax.synthesis.modes.MODES
MODES = ("real_only", "cutpaste", "anomalydiffusion", "dfgm", "dfgm_inner")
# dfgm_jax.synthesis.matching.BACKENDS
BACKENDS = ("vgg16_imagenet", "vgg16_random", "pixels")
# dfgm_jax.synthesis.compose.PLACEMENTS
PLACEMENTS = ("same", "random_shift")
# dfgm_jax.synthesis.compose.INTENSITY_MATCHES
INTENSITY_MATCHES = ("none", "ring_mean")
# dfgm_jax.synthesis.pipeline.PROVENANCES
PROVENANCES = ("slice", "patient")
# dfgm_jax.synthesis.masks.REGIONS (mask.region and train.loss_region)
REGIONS = ("ring", "dilated", "inner", "full")
# dfgm_jax.diffusion.sampler.KINDS
SAMPLER_KINDS = ("ddim_blend", "ddpm_blend")
# dfgm_jax.diffusion.schedule.make_schedule
SCHEDULES = ("linear", "cosine")
# The network's (JAX-free, no copies).
PRESETS = tuple(unet_config_lib.PRESETS)
DTYPES = tuple(unet_config_lib.DTYPE_NAMES)
# '' in a config is None (XLA's choice) in UNetConfig.
ATTENTION_IMPLS = tuple(i or "" for i in unet_config_lib.ATTENTION_IMPLS)
# data_pipeline.input_pipeline.READERS
READERS = ("tf", "grain", "synthetic")
# data_pipeline.brats.MODALITIES
MODALITIES = ("t1", "t1ce", "t2", "flair")
# data_pipeline.brats.VERSIONS
VERSIONS = ("2018", "2019", "2020", "2021", "2023")
# data_pipeline.slices.to_output_grid
SPATIAL = ("resize", "pad")
# data_pipeline.builder.FORMAT_DIRS
FORMATS = ("tfrecord", "array_record")
# data_pipeline.preprocess.run
ON_ERROR = ("raise", "skip")

_MISSING = object()


def _get(section: Any, field: str) -> Any:
  """section[field] of a ConfigDict or dict, or _MISSING."""
  try:
    return section[field] if field in section else _MISSING
  except TypeError:
    return _MISSING


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return (isinstance(v, numbers.Real) and not isinstance(v, bool)
          and math.isfinite(v))


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  if low == 1:
    return (lambda v: _is_int(v) and v >= 1), "must be a positive integer"
  return (lambda v: _is_int(v) and v >= low), f"must be an integer >= {low}"


def _any_int():
  return _is_int, "must be an integer"


def _real(low=None, high=None, low_open=False, high_open=False):
  """A finite number in the interval, e.g. _real(0, 1, high_open=True) = [0, 1)."""

  def ok(v):
    if not _is_real(v):
      return False
    if low is not None and (v < low or (low_open and v == low)):
      return False
    if high is not None and (v > high or (high_open and v == high)):
      return False
    return True

  if low is not None and high is not None:
    must = (f"must be in {'(' if low_open else '['}{low:g}, "
            f"{high:g}{')' if high_open else ']'}")
  elif low is not None:
    must = f"must be a number {'>' if low_open else '>='} {low:g}"
  else:
    must = "must be a finite number"
  return ok, must


def _one_of(names):
  return (lambda v: isinstance(v, str) and v in names), f"must be one of {names}"


def _bool():
  return (lambda v: isinstance(v, bool)), "must be True or False"


def _string():
  return (lambda v: isinstance(v, str)), "must be a string"


def _names(allowed, allow_empty=False):
  """A tuple/list of distinct names from `allowed`."""

  def ok(v):
    if isinstance(v, str) or not isinstance(v, (tuple, list)):
      return False
    return ((allow_empty or len(v) > 0) and len(set(v)) == len(v)
            and all(isinstance(x, str) and x in allowed for x in v))

  return ok, (f"must be a {'' if allow_empty else 'non-empty '}tuple of distinct "
              f"names from {allowed}")


def _centers():
  # 'auto', 'all' or comma-separated names without empty ones.
  return ((lambda v: isinstance(v, str) and v.strip() != ""
           and all(p.strip() for p in v.split(","))),
          "must be 'auto', 'all' or comma-separated center names")


def _percentiles():
  return ((lambda v: isinstance(v, (tuple, list)) and len(v) == 2
           and all(_is_real(x) for x in v) and 0 <= v[0] < v[1] <= 100),
          "must be two percentiles (low, high) with 0 <= low < high <= 100")


# field -> (ok(value), what a good value is), per section.
_DATA = {
    "modalities": _names(MODALITIES),
    "require_all_modalities": _bool(),
    "centers": _centers(),
    "merge_site_numbers": _bool(),
    "test_fraction": _real(0, 1, high_open=True),
    "split_seed": _any_int(),
    "slice_stride_mm": _real(0, low_open=True),
    "tumor_slices_per_volume": _int_at_least(0),
    "min_tumor_area_mm2": _real(0),
    "healthy_slices_per_volume": _int_at_least(0),
    "healthy_min_gap_mm": _real(0),
    "healthy_stride_mm": _real(0),
    "healthy_min_brain_frac": _real(0, 1),
    "healthy_max": _int_at_least(0),
    "healthy_seed": _any_int(),
    "healthy_include_private": _bool(),
    "norm_percentiles": _percentiles(),
    "image_size": _int_at_least(1),
    "spatial": _one_of(SPATIAL),
    "formats": _names(FORMATS),
    "num_shards_hint": _int_at_least(0),
    "on_error": _one_of(ON_ERROR),
}

_MODEL = {
    "preset": _one_of(PRESETS),
    "dtype": _one_of(DTYPES),
    "attention_impl": _one_of(ATTENTION_IMPLS),
}

_DIFFUSION = {
    "schedule": _one_of(SCHEDULES),
    "num_steps": _int_at_least(1),
    "beta_start": _real(0, 1, low_open=True, high_open=True),
    "beta_end": _real(0, 1, low_open=True, high_open=True),
}

_MASK = {
    "r_out_240": _real(0),
    "r_in_240": _real(0),
    "region": _one_of(REGIONS),
}

_TRAIN = {
    "center": (lambda v: isinstance(v, str) and v.strip() != "",
               "must be a center name"),
    "reader": _one_of(READERS),
    "batch_size": _int_at_least(1),
    "p_healthy": _real(0, 1),
    "n_shot": _int_at_least(0),
    "loss_region": _one_of(REGIONS),
    "lr": _real(0, low_open=True),
    "warmup_steps": _int_at_least(0),
    "b1": _real(0, 1, high_open=True),
    "b2": _real(0, 1, high_open=True),
    "weight_decay": _real(0),
    "grad_clip": _real(0, low_open=True),
    "ema_decay": _real(0, 1),
    "num_steps": _int_at_least(0),
    "steps_per_dispatch": _int_at_least(1),
    "log_every": _int_at_least(1),
    "checkpoint_every": _int_at_least(1),
    "checkpoints_to_keep": _int_at_least(1),
    "async_checkpoints": _bool(),
    "tensorboard": _bool(),
    "sampler_seed": _any_int(),
    "aug_hflip": _real(0, 1),
    "aug_rot_prob": _real(0, 1),
    "aug_rot_deg": _real(0),
}

_SAMPLER = {
    "kind": _one_of(SAMPLER_KINDS),
    "steps": _int_at_least(1),
    "eta": _real(0, 1),
    "jump_length": _int_at_least(1),
    "resamples": _int_at_least(1),
    "start_strength": _real(0, 1, low_open=True),
    "adaptive_dilation": _bool(),
    "final_paste": _bool(),
    "batch_size": _int_at_least(1),
    "unroll": _int_at_least(1),
}

_SYNTHESIS = {
    "mode": _one_of(MODES),
    "centers": _string(),
    "backend": _one_of(BACKENDS),
    "k": _int_at_least(1),
    "mask_tumor": _bool(),
    "min_inside_brain": _real(0, 1),
    "exclude_same_patient": _bool(),
    "placement": _one_of(PLACEMENTS),
    "hflip": _bool(),
    "intensity_match": _one_of(INTENSITY_MATCHES),
    "provenance": _one_of(PROVENANCES),
    "figure_rows": _int_at_least(0),
}

_PHANTOM = {
    "version": _one_of(VERSIONS),
    "num_cases": _int_at_least(1),
    "seed": _any_int(),
    "scale": _real(0, 1, low_open=True),
}

# The downstream segmenter (configs/segmentation.py); train/segmentation.py
# checks what needs the devices (batch_size against the device count).
_SEG = {
    "width": _int_at_least(1),
    "depth": _int_at_least(0),
    "bilinear": _bool(),
    "dtype": _one_of(("float32", "bfloat16")),
    "lr": _real(0, low_open=True),
    "loss": _one_of(("bce", "bce_dice")),
    "batch_size": _int_at_least(1),
    "budget": _one_of(("steps", "epochs")),
    "steps": _int_at_least(1),
    "epochs": _int_at_least(1),
    "hflip": _real(0, 1),
    "seeds": ((lambda v: isinstance(v, (tuple, list)) and len(v) >= 1
               and all(_is_int(x) for x in v) and len(set(v)) == len(v)),
              "must be distinct integers, at least one"),
    "stack_seeds": _one_of(("auto", "stacked", "sequential")),
    "log_every": _int_at_least(1),
    "checkpoint_every_epochs": _int_at_least(0),
    "checkpoints_to_keep": _int_at_least(1),
    "async_checkpoints": _bool(),
    "tensorboard": _bool(),
}

# The pipeline's comparisons (configs/segmentation.py get_evaluation_config).
_EVALUATION = {
    "baselines": _names(("cutpaste", "anomalydiffusion"), allow_empty=True),
    "quality_max_slices": _int_at_least(0),
    "quality_kid_subsets": _int_at_least(1),
    "quality_kid_subset_size": _int_at_least(2),
    "quality_real_splits": _int_at_least(1),
    "min_test_patients": _int_at_least(1),
}

_BENCH = {
    "warmup_steps": _int_at_least(0),
    "steps": _int_at_least(1),
    "peak_tflops": _real(0),
    "reps": _int_at_least(1),
    "checkpoint_dir": _string(),
    "profile_dir": _string(),
}

# dfgm_jax.train.federated.ENGINES (tests/test_federated.py keeps them equal)
FED_ENGINES = ("auto", "stacked", "sequential")

# Federated training of G1 (configs/federated.py).
_FED = {
    "rounds": _int_at_least(1),
    "local_steps": _int_at_least(1),
    "centers": _string(),
    "fedprox_mu": _real(0),
    "engine": _one_of(FED_ENGINES),
}

# dfgm_jax.train.dp.UNITS and ACCOUNTANTS (tests/test_dp.py keeps them equal)
DP_UNITS = ("patient", "example")
DP_ACCOUNTANTS = ("rdp", "pld")

# DP-SGD of the diffusion training (configs/diffusion.py get_dp_config).
_DP = {
    "enabled": _bool(),
    "unit": _one_of(DP_UNITS),
    "slices_per_patient": _int_at_least(1),
    "noise_multiplier": _real(0),
    "clip_norm": _real(0, low_open=True),
    "delta": _real(0, 1, low_open=True, high_open=True),
    "target_epsilon": _real(0),
    "accountant": _one_of(DP_ACCOUNTANTS),
}

# Which decentralized stages run_pipeline runs (configs/federated.py).
_DECENTRALIZED = {
    "federated_g1": _bool(),
    "g2": _bool(),
    "local_synthesis": _one_of(("", "harmonise", "generate")),
    "local_k": _int_at_least(0),
}

SECTIONS = {
    "data": _DATA, "model": _MODEL, "diffusion": _DIFFUSION, "mask": _MASK,
    "train": _TRAIN, "sampler": _SAMPLER, "synthesis": _SYNTHESIS,
    "phantom": _PHANTOM, "bench": _BENCH, "seg": _SEG,
    "evaluation": _EVALUATION, "fed": _FED, "decentralized": _DECENTRALIZED, "dp": _DP,
}


def _fail(path: str, value: Any, must: str):
  raise errors.ConfigError(f"config.{path}={value!r}: {must}")


def _check_section(section: Mapping[str, Any], name: str) -> None:
  for field, (ok, must) in SECTIONS[name].items():
    value = _get(section, field)
    if value is not _MISSING and not ok(value):
      _fail(f"{name}.{field}", value, must)


def validate_data(cfg: Mapping[str, Any]) -> None:
  """Checks a `data` section (config.data, or its to_dict() as the data layer has it).

  Raises:
    errors.ConfigError: 'config.data.<field>=<value>: <what is allowed>' for
      the first bad value.
  """
  _check_section(cfg, "data")


def validate(config: Mapping[str, Any]) -> None:
  """Checks every section present in `config`; cheap, no I/O, no JAX.

  Args:
    config: a ConfigDict (or dict of dicts) as the configs/ files build it;
      sections and fields it does not know are left alone.

  Raises:
    errors.ConfigError: one line naming the first bad field, its value and
      the allowed range, e.g. 'config.train.batch_size=0: must be a positive
      integer'.
  """
  seed = _get(config, "seed")
  if seed is not _MISSING and not _is_int(seed):
    _fail("seed", seed, "must be an integer")
  for name in SECTIONS:
    section = _get(config, name)
    if section is not _MISSING and section is not None:
      _check_section(section, name)
  _check_across_sections(config)


def unet_config(config) -> "unet_config_lib.UNetConfig":
  """The network's UNetConfig from config.model and config.data (no JAX).

  The same as dfgm_jax.diffusion.denoiser.model_config (a test keeps them
  equal): the preset, its non-None overrides, the data's image size and
  channels unless overridden, the runtime dtype and attention kernel.
  """
  m = config["model"]
  overrides = {k: v for k, v in dict(_get(m, "overrides") or {}).items()
               if v is not None}
  overrides.setdefault("image_size", config["data"]["image_size"])
  overrides.setdefault("in_channels", len(config["data"]["modalities"]))
  overrides["dtype"] = m["dtype"]
  overrides["attention_impl"] = m["attention_impl"] or None
  return unet_config_lib.get_preset(m["preset"], **overrides)


def _check_across_sections(config) -> None:
  """Values that are fine alone but not together."""
  dec = _get(config, "decentralized")
  if dec is not _MISSING and _get(dec, "local_synthesis") and not _get(dec, "g2"):
    _fail("decentralized.local_synthesis", dec["local_synthesis"],
          "needs config.decentralized.g2=True (local synthesis runs G2's export)")
  if _get(config, "model") is not _MISSING and _get(config, "data") is not _MISSING:
    try:  # The network's own checks (e.g. image_size vs its levels).
      unet_config(config)
    except errors.ConfigError as e:
      overrides = {k: v for k, v in dict(_get(config["model"], "overrides") or {}).items()
                   if v is not None}
      given = f", overrides {overrides}" if overrides else ""
      raise errors.ConfigError(
          f"config.model (preset {config['model']['preset']!r}{given} with "
          f"config.data.image_size={config['data']['image_size']!r}): {e}") from None
  mask = _get(config, "mask")
  if mask is not _MISSING:
    region = _get(mask, "region")
    if region == "inner" and _get(mask, "r_in_240") == 0:
      _fail("mask.r_in_240", mask["r_in_240"],
            "must be > 0 when config.mask.region='inner' (else it is 'ring')")
    regions = {region}
    train = _get(config, "train")
    if train is not _MISSING:
      regions.add(_get(train, "loss_region"))
    r_out = _get(mask, "r_out_240")
    if regions & {"ring", "inner"} and r_out == 0:
      _fail("mask.r_out_240", r_out,
            "must be > 0 for a 'ring' or 'inner' region (else the ring is empty)")
  diffusion = _get(config, "diffusion")
  if (diffusion is not _MISSING and _get(diffusion, "schedule") == "linear"
      and _get(diffusion, "beta_start") >= _get(diffusion, "beta_end")):
    _fail("diffusion.beta_start", diffusion["beta_start"],
          f"must be below config.diffusion.beta_end={diffusion['beta_end']!r}")
  sampler = _get(config, "sampler")
  if (sampler is not _MISSING and diffusion is not _MISSING
      and _get(sampler, "kind") == "ddim_blend"):
    steps, total = _get(sampler, "steps"), _get(diffusion, "num_steps")
    if _is_int(steps) and _is_int(total) and steps > total:
      _fail("sampler.steps", steps,
            f"must be at most config.diffusion.num_steps={total} (the DDIM grid "
            "is a subset of the training steps)")
