"""Exported models (dfgm_jax/model_io.py): round trip and every refusal."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax import parallel
from dfgm_jax.diffusion import denoiser
from dfgm_jax.train import diffusion


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config = tiny.get_config()
  _, _, state = diffusion.init_state(config)
  out = str(tmp_path_factory.mktemp("export") / "model")
  model_io.export(state["ema"], config, 7, out)
  return config, state["ema"], out


def test_round_trip_is_exact_and_self_describing(exported):
  config, params, out = exported
  assert sorted(os.listdir(out)) == ["model.json", "params.npz"]
  assert not os.path.exists(out + ".tmp")
  other = tiny.get_config()
  other.model.overrides.dropout = 0.3  # the export's sections win...
  other.model.dtype = "bfloat16"  # ...but how to run stays the command's.
  model = denoiser.Denoiser.load(out, other, parallel.make_mesh(1))
  got_config, got, step = model.config, model.params, model.step
  assert step == 7
  assert got_config.model.overrides.to_dict() == config.model.overrides.to_dict()
  assert got_config.model.dtype == "bfloat16"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  record = json.load(open(os.path.join(out, "model.json")))
  assert record["num_params"] == sum(x.size for x in jax.tree.leaves(params))
  assert record["config"]["data"]["image_size"] == config.data.image_size


def test_model_error_is_a_user_error():
  assert issubclass(model_io.ModelError, errors.UserError)


def test_existing_export_is_not_overwritten_silently(exported):
  config, params, out = exported
  with pytest.raises(model_io.ModelError, match="holds another export") as e:
    model_io.export(params, config, 8, out)  # another step.
  assert str(e.value).endswith("pass --overwrite to replace it")
  other = jax.tree.map(lambda x: x + 1, params)
  with pytest.raises(model_io.ModelError, match="holds another export"):
    model_io.export(other, config, 7, out)  # other weights.
  # The same export again (a pasted command rerun): reused, nothing rewritten.
  mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
  assert model_io.export(params, config, 7, out) == out
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == mtimes


def test_wrong_format_missing_leaf_and_wrong_shape_are_refused(exported, tmp_path):
  config, params, out = exported
  record, arrays = model_io.read_export(out)
  bad = tmp_path / "model.json"
  bad.write_text(json.dumps({**record, "format": "something-else/9"}))
  with pytest.raises(model_io.ModelError, match="format"):
    model_io.read_export(str(tmp_path))
  (tmp_path / "model.json").write_text("{not json")
  with pytest.raises(model_io.ModelError, match="unreadable"):
    model_io.read_export(str(tmp_path))
  name = sorted(arrays)[0]
  with pytest.raises(model_io.ModelError, match="missing"):
    model_io.fill(params, {k: v for k, v in arrays.items() if k != name}, "src")
  with pytest.raises(model_io.ModelError, match=f"{name} has shape"):
    model_io.fill(params, {**arrays, name: np.zeros((3, 3), np.float32)}, "src")


def test_folder_that_is_neither_export_nor_workdir(tmp_path):
  with pytest.raises(model_io.ModelError, match="neither an exported model"):
    denoiser.Denoiser.load(str(tmp_path), tiny.get_config(), parallel.make_mesh(1))
