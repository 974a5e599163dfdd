"""Tests of the denoiser's config and presets (models/unet_config.py)."""

import subprocess
import sys

import pytest

from dfgm_jax import errors
from dfgm_jax.models import unet_config as C


def test_config_validation():
  with pytest.raises(ValueError, match="unknown UNet preset"):
    C.get_preset("huge")
  with pytest.raises(ValueError, match="gn_groups"):
    C.get_preset("tiny", gn_groups=5)
  with pytest.raises(ValueError, match="divisible"):
    C.get_preset("small", image_size=100)
  with pytest.raises(ValueError, match="cudnn"):
    C.get_preset("tiny", attention_impl="cudnn")
  cfg = C.get_preset("tiny", channel_mult=[1, 2], attention_resolutions=[16])
  assert cfg == C.get_preset("tiny") and hash(cfg) == hash(C.get_preset("tiny"))


@pytest.mark.parametrize("name,overrides,match", [
    ("huge", {}, "unknown UNet preset"),
    ("tiny", dict(dropout=1.0), "dropout"),
    ("tiny", dict(dtype="float16"), "dtype"),
    ("tiny", dict(base_chanels=32), "base_chanels"),
])
def test_bad_settings_are_the_users_errors(name, overrides, match):
  # A UserError ends a binary with one line, not a traceback.
  with pytest.raises(errors.ConfigError, match=match):
    C.get_preset(name, **overrides)


def test_compute_dtype():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  assert C.get_preset("tiny").compute_dtype == jnp.float32
  assert C.get_preset("small").compute_dtype == jnp.bfloat16


def test_unet_reexports_the_config():
  from dfgm_jax.models import unet  # pylint: disable=g-import-not-at-top
  assert unet.UNetConfig is C.UNetConfig and unet.get_preset is C.get_preset
  assert unet.PRESETS is C.PRESETS


def test_config_and_model_config_load_without_jax():
  # configs/diffusion.py builds its override slots from UNetConfig: reading a
  # config must not pay for importing JAX and Flax.
  code = ("import sys, configs.diffusion, dfgm_jax.models.unet_config as c;"
          "c.get_preset('small'); configs.diffusion.get_model_config();"
          "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"
