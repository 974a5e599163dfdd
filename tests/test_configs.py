"""The config files: command-line overrides reach the network."""

import dataclasses

from absl import flags
from ml_collections import config_flags
import pytest

import configs
from configs import diffusion as diffusion_config
from dfgm_jax.models import unet
from dfgm_jax.diffusion import denoiser
from dfgm_jax.train import diffusion


def _parse(*args, config="default.py"):
  """Parses `--config=configs/<config> args` into a fresh FlagValues."""
  argv = ["prog", f"--config={configs.path(config)}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_every_unet_field_can_be_overridden_from_the_command_line():
  config = _parse("--config.model.overrides.dropout=0.0",
                  "--config.model.overrides.attention_resolutions=(32,16)",
                  "--config.model.overrides.remat=True",
                  "--config.model.preset=small")
  got = denoiser.model_config(config)
  want = dataclasses.replace(unet.PRESETS["small"], dropout=0.0,
                             attention_resolutions=(32, 16), remat=True,
                             dtype=config.model.dtype)
  assert got == want
  # Every field a user may override has a typed slot, unset by default.
  runtime = set(diffusion_config._RUNTIME_UNET_FIELDS)
  fields = {f.name for f in dataclasses.fields(unet.UNetConfig)} - runtime
  assert set(config.model.overrides.keys()) == fields


def test_unset_overrides_keep_the_preset_and_the_data_section():
  config = _parse("--config.model.preset=tiny", "--config.data.image_size=32")
  got = denoiser.model_config(config)
  assert got.base_channels == unet.PRESETS["tiny"].base_channels
  assert got.image_size == 32  # from config.data, not the preset's.
  assert got.in_channels == len(config.data.modalities)


def test_a_misspelt_override_is_refused():
  with pytest.raises(Exception, match="dropuot"):
    _parse("--config.model.overrides.dropuot=0.0")
