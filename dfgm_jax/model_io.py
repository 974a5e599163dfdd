"""Exported models: a self-contained folder another institute can sample with.

  <dir>/model.json   format, step, parameter count, sha256 of params.npz, and
                     the config sections that define the network and its
                     sampling (model, diffusion, mask, data.image_size,
                     data.modalities)
  <dir>/params.npz   the EMA parameters, one float array per leaf, named by
                     its path ("down/0/res/0/conv1/kernel")
  <dir>/model_card.json, model_card.md
                     (a shared model, G2) what the model saw and how it was
                     trained (train/g2.py fills it); model.json holds the
                     card's sha256, so an altered card is caught like
                     altered weights

No pickles (np.load with allow_pickle=False), no orbax version coupling, no
paths, center data or patient identifiers. The folder is written to a
temporary name and renamed, so an export that exists is complete; the
sha256 catches a truncated or altered copy.

Reading a model for sampling (an export or a training workdir) is
diffusion/denoiser.py's `Denoiser.load`; this module holds the format.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
from typing import Callable

from etils import epath
import jax
import ml_collections
import numpy as np
from absl import logging

from dfgm_jax import errors

FORMAT = "dfgm-jax-model/1"
MODEL_JSON = "model.json"
PARAMS = "params.npz"
MODEL_CARD = "model_card.json"
MODEL_CARD_MD = "model_card.md"
# Sections an export carries: they define the network and how it samples.
SECTIONS = ("model", "diffusion", "mask")
DATA_FIELDS = ("image_size", "modalities")
# Fields of those sections that stay the command's: how to run, not what.
RUNTIME_FIELDS = {"model": ("dtype", "attention_impl")}


class ModelError(errors.UserError, ValueError):
  """An export or checkpoint folder that cannot be used; names the path."""


# Reading goes through epath, so an export or a training workdir may sit in a
# bucket (gs://...); writing an export stays local (np.savez, os.replace).


def is_export(directory: str) -> bool:
  return (epath.Path(directory) / MODEL_JSON).exists()


def leaf_name(path) -> str:
  """'down/0/res/1/conv1/kernel' for a parameter leaf's pytree path."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":  # nnx.Variable's payload.
        parts.append(key.name)
    else:
      parts.append(str(key))
  return "/".join(parts)


def flatten(params) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {leaf_name(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:  # the export being written: local.
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def export(params, config, step: int, out_dir: str, *, overwrite: bool = False,
           extra: dict | None = None, loss_region: str | None = None,
           card: dict | None = None, card_markdown: Callable[[dict], str] | None = None
           ) -> str:
  """Writes an export of `params` (the EMA) with config's defining sections.

  loss_region: the region the weights were trained to regenerate
  (train.loss_region of their run), recorded as config.train.loss_region so
  that a synthesis mode the model was not trained for is refused from the
  export alone; None leaves it out (unknown).
  card: a model card (JSON-able, no paths or identifiers: the caller's
  responsibility), written as model_card.json with a "weights" entry added
  here (params_sha256, step, num_params: the card names the weights it
  describes) and as model_card.md by card_markdown (default: the JSON in a
  code block). Written inside the folder before it is renamed into place.
  """
  out_dir = os.path.abspath(out_dir)
  arrays = flatten(params)
  if os.path.exists(out_dir) and not overwrite:
    if card is None and _holds(out_dir, arrays, step):
      return out_dir  # this export already: a rerun rewrites nothing.
    raise ModelError(f"{out_dir} holds another export (or other files); pass "
                     "--overwrite to replace it")
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.savez(os.path.join(tmp, PARAMS), **arrays)
  record = {
      "format": FORMAT, "step": int(step),
      "num_params": int(sum(a.size for a in arrays.values())),
      "num_leaves": len(arrays),
      "params_sha256": _sha256(os.path.join(tmp, PARAMS)),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": defining_sections(config.to_dict()),
      **(extra or {}),
  }
  if loss_region is not None:
    record["config"]["train"] = {"loss_region": loss_region}
  if card is not None:
    card = {**card, "weights": {k: record[k] for k in ("params_sha256", "step",
                                                       "num_params")}}
    _write_card(tmp, card, card_markdown)
    record["model_card_sha256"] = _sha256(os.path.join(tmp, MODEL_CARD))
  with open(os.path.join(tmp, MODEL_JSON), "w") as f:
    json.dump(record, f, indent=1)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return out_dir


def _holds(directory: str, arrays: dict, step: int) -> bool:
  """Whether `directory` is an export of these weights at this step.

  The weights are compared, not params_sha256: the zip of params.npz stores
  the time it was written, so a new write of the same weights hashes apart.
  """
  try:
    record, stored = read_export(directory)
  except ModelError:
    return False
  return (record["step"] == int(step) and stored.keys() == arrays.keys()
          and all(np.array_equal(stored[k], arrays[k]) for k in arrays))


def replace_card(directory: str, card: dict,
                 card_markdown: Callable[[dict], str] | None = None) -> str:
  """The export at `directory` with a new model card, its weights untouched.

  params.npz is copied byte for byte (a new export would differ: the zip
  stores the time it was written), so params_sha256 stays and whatever was
  measured on these weights still names them. Written aside and renamed into
  place like `export`.
  """
  record = read_record(directory)
  card = {**card, "weights": {k: record[k] for k in ("params_sha256", "step",
                                                     "num_params")}}
  directory = os.path.abspath(directory)
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  shutil.copy2(os.path.join(directory, PARAMS), os.path.join(tmp, PARAMS))
  if _sha256(os.path.join(tmp, PARAMS)) != record["params_sha256"]:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ModelError(f"{directory}/{PARAMS}: checksum mismatch (altered copy)")
  _write_card(tmp, card, card_markdown)
  record["model_card_sha256"] = _sha256(os.path.join(tmp, MODEL_CARD))
  with open(os.path.join(tmp, MODEL_JSON), "w") as f:
    json.dump(record, f, indent=1)
  old = f"{directory}.old{os.getpid()}"
  os.replace(directory, old)
  os.replace(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)
  return directory


def _write_card(directory: str, card: dict, card_markdown) -> None:
  with open(os.path.join(directory, MODEL_CARD), "w") as f:
    json.dump(card, f, indent=1)
    f.write("\n")
  text = (card_markdown(card) if card_markdown is not None else
          "# Model card\n\n```json\n" + json.dumps(card, indent=1) + "\n```\n")
  with open(os.path.join(directory, MODEL_CARD_MD), "w") as f:
    f.write(text)


def read_card(directory: str) -> dict | None:
  """The export's model card (sha256 checked against model.json); None without one."""
  record = read_record(directory)
  path = epath.Path(directory) / MODEL_CARD
  if "model_card_sha256" not in record:
    return None
  if not path.exists():
    raise ModelError(f"{path}: missing (model.json names a model card)")
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != record["model_card_sha256"]:
    raise ModelError(f"{path}: checksum mismatch (altered model card)")
  return json.loads(data)


def read_record(directory: str) -> dict:
  """The export's model.json (format checked; the weights are not read)."""
  path = os.path.join(directory, MODEL_JSON)
  try:
    record = json.loads(epath.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ModelError(f"{path}: unreadable model description ({e})") from e
  if record.get("format") != FORMAT:
    raise ModelError(f"{path}: format {record.get('format')!r}, expected {FORMAT!r}")
  return record


def read_export(directory: str) -> tuple[dict, dict]:
  """(model.json record, {leaf name: array}); checks format and checksum."""
  record = read_record(directory)
  params_path = os.path.join(directory, PARAMS)
  if not epath.Path(params_path).exists():
    raise ModelError(f"{params_path}: missing")
  # Read once: checksum and load from the same bytes (one download from a bucket).
  data = epath.Path(params_path).read_bytes()
  if hashlib.sha256(data).hexdigest() != record["params_sha256"]:
    raise ModelError(f"{params_path}: checksum mismatch (truncated or altered copy)")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile/numpy raise several types.
    raise ModelError(f"{params_path}: unreadable ({type(e).__name__}: {e})") from e
  return record, arrays


def defining_sections(config: dict) -> dict:
  """The sections of a config (as a dict) that an export carries."""
  return {**{s: config[s] for s in SECTIONS},
          "data": {k: config["data"][k] for k in DATA_FIELDS}}


def apply_model_config(config, saved: dict, source: str):
  """A copy of `config` whose defining sections are the model's (`saved`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for section in SECTIONS:
    runtime = {k: config[section][k] for k in RUNTIME_FIELDS.get(section, ())
               if k in config[section]}
    if config[section].to_dict() != {**saved[section], **runtime}:
      logging.info("config.%s comes from the model at %s", section, source)
    config[section] = ml_collections.ConfigDict({**saved[section], **runtime})
  for key in DATA_FIELDS:
    value = saved["data"][key]
    config.data[key] = tuple(value) if isinstance(value, list) else value
  return config


def fill(template, arrays: dict, source: str):
  """`template`'s pytree with its leaves replaced by `arrays` (by name)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [leaf_name(p) for p, _ in paths]
  missing = sorted(set(names) - set(arrays))
  unexpected = sorted(set(arrays) - set(names))
  if missing or unexpected:
    raise ModelError(f"{source}: parameters do not fit the network "
                     f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
  leaves = []
  for (_, x), name in zip(paths, names):
    a = arrays[name]
    if a.shape != tuple(x.shape):  # x: an array or a ShapeDtypeStruct.
      raise ModelError(f"{source}: {name} has shape {a.shape}, the network {tuple(x.shape)}")
    leaves.append(a.astype(x.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def export_workdir(model_dir: str, config, out_dir: str, *, overwrite: bool = False,
                   card: dict | None = None,
                   card_markdown: Callable[[dict], str] | None = None
                   ) -> tuple[str, int]:
  """Exports the newest readable checkpoint of a training workdir; (out, step).

  card, card_markdown: a model card for the export (see `export`).
  """
  from dfgm_jax.diffusion import denoiser  # pylint: disable=g-import-not-at-top
  d = denoiser.Denoiser.load(model_dir, config)
  return export(d.params, d.config, d.step, out_dir, overwrite=overwrite,
                loss_region=d.loss_region, card=card,
                card_markdown=card_markdown), d.step
