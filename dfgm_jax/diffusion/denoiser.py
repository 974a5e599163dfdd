"""A diffusion model and its sampler: the one seam synthesis, figures and benchmarks use.

Turns a config into the network's UNetConfig, the noise schedule and the
sampler settings. (Loading a model folder and the jitted sampler join here.)
"""

from __future__ import annotations

import dataclasses

from dfgm_jax.diffusion import sampler as sampler_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.models import unet


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
