"""Config validation (dfgm_jax/config_checks.py): one line per bad value, before any work."""

import subprocess
import sys

import pytest

from configs import benchmark
from configs import default
from configs import demo
from configs import real_cpu
from configs import tiny
from dfgm_jax import config_checks
from dfgm_jax import errors
from tests.conftest import ROOT


def _with(config, path, value):
  """A copy of `config` with `path` (e.g. 'train.batch_size') set to `value`."""
  config = config.copy_and_resolve_references()
  *sections, field = path.split(".")
  node = config
  for name in sections:
    node = node[name]
  with node.ignore_type():
    node[field] = value
  return config


@pytest.mark.parametrize("config", [
    default.get_config(), default.get_config("paper"), default.get_config("runlocal"),
    tiny.get_config(), demo.get_config(), benchmark.get_config(),
    benchmark.get_config("cpu"), real_cpu.get_config()],
    ids=["default", "paper", "runlocal", "tiny", "demo", "benchmark", "benchmark_cpu",
         "real_cpu"])
def test_every_shipped_config_is_valid(config):
  config_checks.validate(config)


@pytest.mark.parametrize("path,value,message", [
    ("train.batch_size", 0, "config.train.batch_size=0: must be a positive integer"),
    ("train.lr", -1e-4, "config.train.lr=-0.0001: must be a number > 0"),
    ("train.lr", 0.0, "config.train.lr=0.0: must be a number > 0"),
    ("train.p_healthy", 1.5, "config.train.p_healthy=1.5: must be in [0, 1]"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every=0: must be a positive"),
    ("train.log_every", 0, "config.train.log_every=0: must be a positive integer"),
    ("train.num_steps", -1, "config.train.num_steps=-1: must be an integer >= 0"),
    ("train.steps_per_dispatch", 0, "config.train.steps_per_dispatch=0: must be a pos"),
    ("train.loss_region", "rim", "config.train.loss_region='rim': must be one of"),
    ("train.reader", "tfds", "config.train.reader='tfds': must be one of"),
    ("data.image_size", 0, "config.data.image_size=0: must be a positive integer"),
    ("data.modalities", ("t3",), "config.data.modalities=('t3',): must be a non-empty"),
    ("data.modalities", (), "config.data.modalities=(): must be a non-empty"),
    ("data.test_fraction", 1.0, "config.data.test_fraction=1.0: must be in [0, 1)"),
    ("data.slice_stride_mm", 0.0, "config.data.slice_stride_mm=0.0: must be a number > 0"),
    ("data.spatial", "crop", "config.data.spatial='crop': must be one of ('resize', 'pad')"),
    ("data.formats", ("zip",), "config.data.formats=('zip',): must be a non-empty"),
    ("data.on_error", "ignore", "config.data.on_error='ignore': must be one of"),
    ("data.centers", "CBICA,", "config.data.centers='CBICA,': must be 'auto', 'all'"),
    ("sampler.batch_size", 0, "config.sampler.batch_size=0: must be a positive integer"),
    ("sampler.steps", 0, "config.sampler.steps=0: must be a positive integer"),
    ("sampler.jump_length", 0, "config.sampler.jump_length=0: must be a positive"),
    ("sampler.resamples", 0, "config.sampler.resamples=0: must be a positive integer"),
    ("sampler.kind", "ddpm", "config.sampler.kind='ddpm': must be one of"),
    ("synthesis.k", 0, "config.synthesis.k=0: must be a positive integer"),
    ("synthesis.mode", "dfgm2", "config.synthesis.mode='dfgm2': must be one of"),
    ("synthesis.backend", "vgg19", "config.synthesis.backend='vgg19': must be one of"),
    ("synthesis.placement", "anywhere", "config.synthesis.placement='anywhere': must be"),
    ("synthesis.intensity_match", "hist", "config.synthesis.intensity_match='hist': must"),
    ("mask.region", "band", "config.mask.region='band': must be one of"),
    ("mask.r_out_240", -1.0, "config.mask.r_out_240=-1.0: must be a number >= 0"),
    ("mask.r_in_240", -2.0, "config.mask.r_in_240=-2.0: must be a number >= 0"),
    ("model.dtype", "float16", "config.model.dtype='float16': must be one of"),
    ("model.preset", "huge", "config.model.preset='huge': must be one of"),
    ("diffusion.num_steps", 0, "config.diffusion.num_steps=0: must be a positive"),
    ("phantom.scale", 0.0, "config.phantom.scale=0.0: must be in (0, 1]"),
    ("seed", 1.5, "config.seed=1.5: must be an integer"),
])
def test_a_bad_value_is_refused_in_one_line_naming_field_value_and_range(
    path, value, message):
  with pytest.raises(errors.ConfigError) as e:
    config_checks.validate(_with(tiny.get_config(), path, value))
  assert str(e.value).startswith(message)
  assert "\n" not in str(e.value)
  assert isinstance(e.value, errors.UserError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("changes,message", [
    ({"mask.region": "inner", "mask.r_in_240": 0.0},
     "config.mask.r_in_240=0.0: must be > 0 when config.mask.region='inner'"),
    ({"mask.r_out_240": 0.0}, "config.mask.r_out_240=0.0: must be > 0 for a 'ring'"),
    ({"sampler.steps": 101}, "config.sampler.steps=101: must be at most "
                             "config.diffusion.num_steps=100"),
    ({"diffusion.beta_start": 0.03}, "config.diffusion.beta_start=0.03: must be below"),
    ({"data.image_size": 33}, "config.model (preset 'tiny' with config.data.image_size=33): "
                              "image_size=33 is not divisible by 2**"),
    ({"model.attention_impl": "cudnn"}, "config.model (preset 'tiny' with "
                                        "config.data.image_size=32): attention_impl='cudnn' "
                                        "needs dtype='bfloat16'"),
])
def test_values_that_do_not_fit_together_are_refused(changes, message):
  config = tiny.get_config()
  for path, value in changes.items():
    config = _with(config, path, value)
  with pytest.raises(errors.ConfigError) as e:
    config_checks.validate(config)
  assert str(e.value).startswith(message)


def test_sections_and_fields_it_does_not_know_are_left_alone():
  config_checks.validate({"train": {"batch_size": 8, "new_field": -1}, "other": {"x": 0}})
  with pytest.raises(errors.ConfigError, match="config.train.batch_size=-8"):
    config_checks.validate({"train": {"batch_size": -8}})
  # The data layer's dict (config.data.to_dict()).
  cfg = default.get_config().data.to_dict()
  config_checks.validate_data(cfg)
  cfg["image_size"] = 0
  with pytest.raises(errors.ConfigError, match=r"^config.data.image_size=0: must be"):
    config_checks.validate_data(cfg)


@pytest.mark.parametrize("config", [default.get_config(), benchmark.get_config("cpu"),
                                    tiny.get_config()], ids=["default", "bench_cpu", "tiny"])
def test_the_network_it_checks_is_the_one_the_library_builds(config):
  from dfgm_jax.diffusion import denoiser
  config = _with(config, "model.overrides.dropout", 0.0)
  assert config_checks.unet_config(config) == denoiser.model_config(config)


def test_the_copied_allowed_values_equal_the_librarys():
  from data_pipeline import brats
  from data_pipeline import builder
  from data_pipeline import input_pipeline
  from dfgm_jax.diffusion import sampler
  from dfgm_jax.diffusion import schedule
  from dfgm_jax.models import unet
  from dfgm_jax.synthesis import compose
  from dfgm_jax.synthesis import masks
  from dfgm_jax.synthesis import matching
  from dfgm_jax.synthesis import modes
  c = config_checks
  assert c.MODES == modes.MODES
  assert c.BACKENDS == matching.BACKENDS
  assert c.PLACEMENTS == compose.PLACEMENTS
  assert c.INTENSITY_MATCHES == compose.INTENSITY_MATCHES
  assert c.REGIONS == masks.REGIONS
  assert c.SAMPLER_KINDS == sampler.KINDS
  assert set(c.PRESETS) == set(unet.PRESETS) and "small" in c.PRESETS
  assert set(c.DTYPES) == set(unet.DTYPE_NAMES) == {"float32", "bfloat16"}
  assert {i or None for i in c.ATTENTION_IMPLS} == set(unet.ATTENTION_IMPLS)
  assert c.READERS == input_pipeline.READERS
  assert c.MODALITIES == brats.MODALITIES
  assert c.VERSIONS == brats.VERSIONS
  assert set(c.FORMATS) == set(builder.FORMAT_DIRS)
  for kind in c.SCHEDULES:
    schedule.make_schedule(kind, 10)
  with pytest.raises(ValueError, match="unknown schedule"):
    schedule.make_schedule("sigmoid", 10)


def test_the_module_imports_without_jax():
  # The data layer imports it where JAX is missing.
  code = ("import sys; sys.modules['jax'] = sys.modules['flax'] = None; "
          "sys.modules['numpy'] = None; "
          f"sys.path.insert(0, {ROOT!r}); from dfgm_jax import config_checks; "
          "config_checks.validate_data({'image_size': 8})")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
