"""The config files: variants, the demo's frozen values, overrides reaching the network."""

import ast
import dataclasses
import json
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

import configs
from configs import benchmark
from configs import default
from configs import demo
from configs import real_cpu
from configs import diffusion as diffusion_config
from configs import segmentation
from configs import tiny
from data_pipeline import slices
from dfgm_jax import errors
from dfgm_jax.models import unet
from dfgm_jax.diffusion import denoiser
from tests.conftest import ROOT


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


def _as_json(config):
  """A config's values as JSON would store them (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict()))


def test_the_demo_config_keeps_its_values():
  # The demo's figures (its final G1 loss) depend on every value; a change
  # must be deliberate: update tests/data/demo_config.json in the same commit.
  with open(os.path.join(ROOT, "tests", "data", "demo_config.json")) as f:
    frozen = json.load(f)
  assert _as_json(demo.get_config()) == frozen


def test_the_demo_config_stands_on_its_own():
  # Tests tune tiny.py; that must not reach the demo.
  with open(configs.path("demo.py")) as f:
    tree = ast.parse(f.read())
  imported = {alias.name for node in ast.walk(tree)
              if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
  assert imported and "tiny" not in imported and "configs.tiny" not in imported


def test_the_real_config_gives_each_private_center_a_train_and_a_test_patient():
  # The eleven BraTS 2018 cases of docs/real_data_run.md: CBICA 2, TCIA 6.
  config = real_cpu.get_config()
  assert config.data.centers == config.fed.centers == "CBICA,TCIA"
  for center, n in (("CBICA", 2), ("TCIA", 6)):
    ids = [f"{center}_{i}" for i in range(n)]
    train, test = slices.split_patients(ids, config.data.test_fraction,
                                        config.data.split_seed, center)
    assert train and test, center
  # Three test patients in all: the evaluation must say "too few to tell",
  # not be made to give intervals by a lowered threshold.
  assert (config.evaluation.min_test_patients ==
          segmentation.get_evaluation_config().min_test_patients > 3)


def test_the_real_config_stands_on_its_own():
  with open(configs.path("real_cpu.py")) as f:
    tree = ast.parse(f.read())
  imported = {alias.name for node in ast.walk(tree)
              if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
  assert imported and not imported & {"tiny", "demo", "configs.tiny", "configs.demo"}


@pytest.mark.parametrize("module,variants", [
    (default, ("", "paper", "runlocal")), (demo, ("",)), (tiny, ("",)),
    (benchmark, ("", "gpu", "cpu")), (real_cpu, ("",))])
def test_documented_variants_work_and_others_are_refused(module, variants):
  for name in (None, *variants):
    assert isinstance(module.get_config(name), ml_collections.ConfigDict)
  assert set(module.VARIANTS) == set(variants)
  file_name = module.__name__.split(".")[-1] + ".py"
  with pytest.raises(errors.UserError) as e:
    module.get_config("nope")
  message = str(e.value)
  assert message.startswith(f"--config=configs/{file_name}:nope: unknown variant")
  for name in variants:  # every valid one is listed.
    assert f"{file_name}{':' + name if name else ''} (" in message


def test_default_centers_fit_any_brats_layout_and_paper_pins_the_papers():
  assert default.get_config().data.centers == "auto"
  assert default.get_config("paper").data.centers == "CBICA,TCIA"
  # The paper variant differs from the default only there.
  plain, paper = _as_json(default.get_config()), _as_json(default.get_config("paper"))
  paper["data"]["centers"] = "auto"
  assert plain == paper


def test_runlocal_reads_the_defaults_slices_with_a_tiny_network():
  plain, local = default.get_config(), default.get_config("runlocal")
  assert local.data.to_dict() == plain.data.to_dict()
  assert local.model.preset == "tiny" and local.train.num_steps < plain.train.num_steps
