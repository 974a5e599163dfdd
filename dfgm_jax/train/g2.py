"""G2, the shared model: trained on shareable data only, exported with a model card.

ALGORITHM.md 6, S4: the centers publish their synthetic sets; G2 is a fresh
model (never initialised from G1) trained on those sets (tumor examples)
plus the public healthy set, then shared. Since all its training data is
public, sharing G2 leaks nothing the synthetic sets did not already publish.

Regions: G2 is conditioned on, and its loss weighs, the dilated tumor D
(mask.region = train.loss_region = "dilated"; S is public, so learning the
whole of D costs no privacy). That one model serves both modes of local
synthesis (synthesis/local.py):
- generate (anomalydiffusion): known = the healthy slice, D generated: the
  region it was trained on, nothing to adapt;
- harmonise (dfgm): known = the cut-paste composite, only the ring D \\ M
  generated. The network is still given D as its conditioning mask (the
  only mask it has ever seen), and the blended sampler keeps the pasted
  tumor known inside D: RePaint-style inpainting of part of the region the
  model learnt to inpaint. The alternative, training with a random ring or
  dilated conditioning per example, would need a second conditioning path
  in the trainer for no gain in what G2 can do: a dilated-conditioned model
  already predicts the ring consistently with whatever lies in the tumor.
  Denoiser.check_mode rightly refuses this pairing for a model in general
  (a ring model must not be given D); local.SharedModel allows it for G2
  alone.

Guard: `check_public` judges every input by its recorded provenance
(dfgm_jax/provenance.py), not by its name alone, and refuses, naming the
split, its folder and why, before anything is read: a preprocessing
output's split other than `healthy`; a `healthy` split that holds
private-patient slices or records no origins; a synthetic set whose manifest
does not state that it is shareable (an institute's local set, a set made on
private-patient backgrounds with data.healthy_include_private, a baseline, a
set made before origins were recorded); a synthetic set's split other than
<center>_synthetic. `train` runs it; the binary and the pipeline build G2's
batches only from the inputs it passed (launch/public_data.py).

Run identity: G2's config gets train.public_data = a hash of its inputs'
fingerprints, so G2 never resumes a checkpoint of G1 (or of a G2 of other
data) found in its workdir: the workdir claim refuses another run.

The model card (model_card.json / .md beside model.json): the inputs'
counts and content hashes (the healthy slices' counts by origin; a synthetic
set's fingerprint too: a hash of its public files; never a preprocessing
output's fingerprint, a private hash over paths, case ids and file times),
the statement of what G2 saw and the guard that enforced it, the training
and sampler settings, and the privacy audit's summary when a finished audit
of a synthetic set G2 was trained on, measuring these weights, is given
(`audit_for_card`; else the card says why there is none). No local path,
case id or salt.

Export and reuse: a finished export of this G2 at the trained step is kept
as it is (its card, audit included); a new audit only replaces its card,
params.npz untouched (model_io.replace_card).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable

from absl import logging
from etils import epath
import numpy as np

from dfgm_jax import errors
from dfgm_jax import model_io
from dfgm_jax import parallel
from dfgm_jax import provenance
from dfgm_jax import stage_io

# data_pipeline.builder.SYNTHETIC_NAME (tests/test_g2.py keeps them equal).
SYNTHETIC_DATASET = "synthetic_slices"
SYNTHETIC_SUFFIX = "_synthetic"
# The one public split of a preprocessing output.
HEALTHY = "healthy"
REGION = "dilated"
CARD_FORMAT = "dfgm-jax-model-card/1"
INPUTS_FILE = "g2_inputs.json"  # in G2's training workdir: the card's data part.
# The privacy audit's done-record beside its privacy.json (privacy/audit.py RECORD).
AUDIT_RECORD = "record.json"
AUDIT_KIND = "synthetic set"  # privacy/audit.py: the candidates' kind it audits.
GUARD = "dfgm_jax.train.g2.check_public"
# Training fields the card reports (what was learnt and how batches were mixed).
_TRAIN_FIELDS = ("batch_size", "p_healthy", "loss_region", "lr", "warmup_steps",
                 "weight_decay", "grad_clip", "ema_decay", "num_steps", "sampler_seed",
                 "aug_hflip", "aug_rot_prob", "aug_rot_deg")


class PrivateDataError(errors.ConfigError):
  """A private split among G2's inputs; names the split and its folder."""


@dataclasses.dataclass(frozen=True)
class PublicInput:
  """One split G2 trains on.

  Attributes:
    role: "tumor" (a synthetic set's split) or "healthy".
    where: the folder, for messages only (never written to the card).
    manifest: the set's manifest.json.
    split: the split's name.
  """

  role: str
  where: str
  manifest: dict
  split: str


def dataset_name(manifest: dict) -> str:
  """The data set a manifest describes ('brats_slices', 'synthetic_slices')."""
  if manifest.get("dataset"):
    return manifest["dataset"]
  # formats: {format: "<format dir>/<name>/<version>"}.
  names = {p.split("/")[1] for p in manifest.get("formats", {}).values()
           if p.count("/") >= 2}
  return names.pop() if len(names) == 1 else "unknown"


def is_synthetic(manifest: dict) -> bool:
  return dataset_name(manifest) == SYNTHETIC_DATASET


def check_public(inputs) -> None:
  """THE guard: refuses any input that is not public by its recorded provenance.

  Public: the <center>_synthetic splits of a synthetic set whose manifest
  states `shareable` (every background a public-origin slice; not a local or
  baseline set) as tumor examples, and a preprocessing output's `healthy`
  split whose slices are all recorded as public-origin as healthy examples.
  Everything else (<center>_train, <center>_test, <center>_healthy, a
  private-origin healthy split, a set that is not shareable) is refused.

  Raises:
    PrivateDataError: naming the split, its folder, why and what is allowed.
  """
  inputs = list(inputs)
  if not any(i.role == "tumor" for i in inputs):
    raise errors.ConfigError("G2 needs at least one synthetic set (its tumor "
                             "examples): none was given")
  for i in inputs:
    private = i.split.endswith(("_train", "_test", provenance.CENTER_HEALTHY_SUFFIX))
    if i.role == "tumor":
      ok = (is_synthetic(i.manifest) and i.split.endswith(SYNTHETIC_SUFFIX)
            and not private)
      allowed = "a shareable synthetic set's <center>_synthetic splits"
    elif i.role == "healthy":
      ok = i.split == HEALTHY and not is_synthetic(i.manifest)
      allowed = f"a preprocessing output's {HEALTHY!r} split of public-origin slices"
    else:
      raise ValueError(f"unknown role {i.role!r}")
    if not ok:
      # A real split but healthy, or any _train/_test, is private; a public
      # split in the wrong role (a synthetic split as healthy) is only misplaced.
      private |= not is_synthetic(i.manifest) and i.split != HEALTHY
      raise PrivateDataError(
          f"G2 trains on public data only: split {i.split!r} of {i.where} "
          f"({dataset_name(i.manifest)}) {'is a private split' if private else 'is refused'}"
          f"; as {i.role} examples G2 takes only {allowed}")
    _check_provenance(i, allowed)
    splits = i.manifest.get("splits", {})
    if i.split not in splits:
      raise errors.ConfigError(f"{i.where}: no split {i.split!r}; splits: "
                               f"{sorted(splits)}")


def _check_provenance(i: PublicInput, allowed: str) -> None:
  """Refuses an input whose recorded origins are not all public."""
  if i.role == "tumor":
    shareable, why = provenance.set_shareable(i.manifest)
    if not shareable:
      raise PrivateDataError(
          f"G2 trains on public data only: the synthetic set {i.where} is not "
          f"shareable ({why}); as tumor examples G2 takes only {allowed}")
    return
  origins = provenance.split_origins(i.manifest, i.split)
  if not provenance.all_public(origins):
    raise PrivateDataError(
        f"G2 trains on public data only: split {i.split!r} of {i.where} holds "
        f"{provenance.describe(origins)}; preprocess with "
        f"{provenance.RESEARCH_SWITCH}=False (the default) for a public-only "
        f"{HEALTHY!r} split" + ("" if origins else " (this output predates recorded "
                                 "origins: preprocess again)"))
  if not origins[provenance.PUBLIC]:
    raise PrivateDataError(
        f"G2 needs public healthy slices: split {i.split!r} of {i.where} is empty "
        "(the data has no volume of a non-private center); add public volumes or "
        "make a center public (config.data.centers)")


# --- Fingerprints ----------------------------------------------------------------


def set_fingerprint(data_dir: str, manifest: dict) -> str:
  """The manifest's `fingerprint`, else a sha256 of manifest.json and the shards.

  A synthetic set has no fingerprint of its own: its manifest and data files
  (every file under its formats' folders, by relative name) identify it.
  """
  if manifest.get("fingerprint"):
    return str(manifest["fingerprint"])
  root = epath.Path(data_dir)
  h = hashlib.sha256((root / "manifest.json").read_bytes())
  for rel in sorted(manifest.get("formats", {}).values()):
    for path in _files(root / rel):
      h.update(str(path.relative_to(root)).encode())
      h.update(path.read_bytes())
  return h.hexdigest()[:16]


def _files(directory: epath.Path) -> list:
  """Every file under `directory`, sorted (no `**` glob: buckets refuse it)."""
  out = []
  for p in sorted(directory.iterdir()):
    out += _files(p) if p.is_dir() else [p]
  return out


def content_sha256(arrays: dict) -> str:
  """sha256 of a split's images and masks as read (float32, in read order)."""
  h = hashlib.sha256()
  for key in ("image", "mask"):
    h.update(np.ascontiguousarray(np.asarray(arrays[key], np.float32)).tobytes())
  return h.hexdigest()


def describe(inp: PublicInput, fingerprint: str, content: str) -> dict:
  """What the card says of one input: no folder, no case id.

  A synthetic set's fingerprint (a hash of its shareable files) is kept; a
  preprocessing output's is not: it hashes local paths, case ids, sizes and
  file times, a private value that would link the card to the center's
  files. The content hash names what G2 saw either way.
  """
  split = inp.manifest["splits"][inp.split]
  out = {"role": inp.role, "dataset": dataset_name(inp.manifest), "split": inp.split,
         "num_slices": int(split["num_slices"]),
         "num_cases": int(split.get("num_cases", 0)), "content_sha256": content}
  if is_synthetic(inp.manifest):
    out["set_fingerprint"] = fingerprint
  if inp.role == "healthy":  # checked all public by the guard; said on the card.
    out["origins"] = provenance.split_origins(inp.manifest, inp.split)
  return out


def inputs_id(described: list[dict]) -> str:
  """Hash of G2's inputs: part of its run identity (train.public_data)."""
  text = json.dumps([[d["role"], d["split"], d.get("set_fingerprint"), d["content_sha256"]]
                     for d in described], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- Config and training ---------------------------------------------------------


def g2_config(config, public_data: str):
  """G2's config: the dilated region, public data, config.g2's train overrides.

  config.g2 (optional, any config.train field, e.g. num_steps) overrides
  config.train for G2 only; train.center means nothing here ("public");
  DP-SGD (config.dp) is off: there is no private slice to protect.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    overrides = config.get("g2")
    if overrides is not None:
      for key, value in overrides.to_dict().items():
        if key not in config.train:
          raise errors.ConfigError(f"config.g2.{key}: not a config.train field "
                                   "(config.g2 overrides config.train for G2)")
        config.train[key] = value
    config.mask.region = REGION
    config.train.loss_region = REGION
    config.train.center = "public"
    config.train.n_shot = 0
    if "dp" in config:
      # DP-SGD protects private slices; G2 has none, so it trains without.
      config.dp.enabled = False
    # Part of the run identity: another G1 or G2 run in the workdir is refused.
    config.train.public_data = public_data
  return config


def train(config, workdir: str, inputs: list[PublicInput], described: list[dict],
          batch_fn: Callable[[int], dict], **train_kwargs) -> dict:
  """Trains (or resumes) G2 in `workdir` on public inputs only.

  Args:
    config: the run's config (G2's comes from g2_config).
    workdir: G2's training workdir (never G1's: refused by its identity).
    inputs: every split the batches are drawn from; checked by check_public
      before training.
    described: describe() of each input, in the same order (fingerprints and
      counts): recorded in workdir/g2_inputs.json for the card.
    batch_fn: step -> batch, drawn from `inputs` only.
    **train_kwargs: diffusion.train's (mesh, progress, stop_at, overwrite).

  Returns:
    diffusion.train's result plus "config" (G2's config).
  """
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  check_public(inputs)
  if len(described) != len(inputs):
    raise ValueError("one description per input")
  g2 = g2_config(config, inputs_id(described))
  result = diffusion.train(g2, workdir, batch_fn, **train_kwargs)
  if parallel.is_main():
    stage_io.write_json(os.path.join(workdir, INPUTS_FILE), {
        "public_data": g2.train.public_data, "inputs": described,
        "guard": GUARD, "inputs_checked": len(inputs)})
  return {**result, "config": g2}


# --- Model card and export -------------------------------------------------------


def summary_sha256(summary: dict) -> str:
  """sha256 of an audit summary as JSON (the audit records it; the card checks it)."""
  return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def audit_for_card(privacy_json: str | None, inputs_record: dict,
                   params_sha256: str | None) -> tuple[dict | None, str]:
  """(the audit summary G2's card may carry, or None; why, in one sentence).

  Only this run's own finished audit: its done-record exists beside
  privacy.json (an audit that was killed, or is being redone, has none), its
  candidates are a synthetic set G2 was trained on (by the set's
  fingerprint: not the training split, not another center's set), it
  measured these weights or no G2 at all (params_sha256), and privacy.json's
  summary is the one the record names.
  """
  if not privacy_json:
    return None, "no privacy audit was given when this model was exported"
  folder = os.path.dirname(privacy_json)
  record = stage_io.read_json(os.path.join(folder, AUDIT_RECORD))
  if record is None or not os.path.exists(privacy_json):
    return None, ("the privacy audit given was not finished (no done-record): it "
                  "is left off")
  cand = record.get("candidates") or {}
  sets = {d.get("set_fingerprint") for d in inputs_record["inputs"] if d["role"] == "tumor"}
  if cand.get("kind") != AUDIT_KIND or cand.get("set_fingerprint") not in sets:
    return None, (f"the privacy audit given is of {cand.get('kind', 'unknown candidates')} "
                  f"{cand.get('split', '')!r}, not of a synthetic set G2 was trained on: "
                  "it is left off")
  measured = (record.get("identity") or {}).get("g2")
  if measured is not None and measured != params_sha256:
    return None, ("the privacy audit given measured other G2 weights (an earlier "
                  "export): it is left off; rerun the audit")
  summary = (json.loads(epath.Path(privacy_json).read_text()).get("summary") or {})
  if summary_sha256(summary) != record.get("summary_sha256"):
    return None, ("the privacy audit's privacy.json does not match its done-record: "
                  "it is left off")
  # Strings that look like paths are left out (the summary holds none).
  return _no_paths(summary), (f"the finished privacy audit of the synthetic set "
                              f"{cand['split']!r} G2 was trained on")


def _no_paths(obj):
  if isinstance(obj, dict):
    return {k: _no_paths(v) for k, v in obj.items() if not _looks_like_path(v)}
  if isinstance(obj, list):
    return [_no_paths(v) for v in obj if not _looks_like_path(v)]
  return obj


def _looks_like_path(v) -> bool:
  return isinstance(v, str) and ("/" in v or os.sep in v or "://" in v)


def model_card(g2_cfg, inputs_record: dict, privacy: dict | None,
               privacy_note: str | None = None) -> dict:
  """The card of G2's export (model_io.export adds the weights' sha256 and step)."""
  tumor = [d for d in inputs_record["inputs"] if d["role"] == "tumor"]
  healthy = [d for d in inputs_record["inputs"] if d["role"] == "healthy"]
  origins = {o: sum((d.get("origins") or {}).get(o, 0) for d in healthy)
             for o in provenance.ORIGINS}
  t = g2_cfg.train
  return {
      "format": CARD_FORMAT,
      "model": "G2",
      "description": ("The shared diffusion model of DFGM (ALGORITHM.md 6, S4): "
                      "trained from a fresh initialisation on shareable data only (published "
                      "synthetic sets and public-center healthy slices), "
                      "for local synthesis in harmonise and generate modes."),
      "initialisation": (f"fresh (seed {int(g2_cfg.seed)}); never initialised "
                         "from G1 or any model trained on private slices"),
      "data": {
          "tumor_examples": tumor,
          "healthy_examples": healthy,
          "tumor_slices": sum(d["num_slices"] for d in tumor),
          "healthy_slices": sum(d["num_slices"] for d in healthy),
          "healthy_origins": origins,
          "public_data_id": inputs_record["public_data"],
      },
      "private_data": {
          "used": False,
          "statement": (
              "No private slice was used as a training image: G2 saw the "
              "<center>_synthetic splits of published sets whose manifests state "
              "they are shareable (every background a public-origin healthy slice) "
              f"and {origins[provenance.PUBLIC]} healthy slices of public-center "
              f"volumes ({origins[provenance.PRIVATE]} of private patients). The "
              "synthetic sets' tumor interiors are the private source tumors, "
              "pasted by design."),
          "guard": inputs_record["guard"],
          "guard_rule": ("judges each input by its recorded provenance: refuses "
                         "<center>_train / <center>_test / <center>_healthy and every "
                         "split of a preprocessing output but 'healthy', a 'healthy' "
                         "split with private-patient or unrecorded origins, and a "
                         "synthetic set whose manifest does not state it is shareable "
                         "(local, baseline or private-background sets); checked on "
                         "every input before any slice was read"),
          "inputs_checked": inputs_record["inputs_checked"],
      },
      "regions": {"conditioning": g2_cfg.mask.region, "loss": t.loss_region,
                  "r_out_240": float(g2_cfg.mask.r_out_240)},
      "modes": {
          "harmonise": ("synthesis mode dfgm: paste a public tumor into a healthy "
                        "slice, regenerate the ring (the network conditioned on "
                        "the dilated tumor, the tumor kept)"),
          "generate": ("synthesis mode anomalydiffusion: from a mask only, the "
                       "dilated region generated into a healthy slice"),
      },
      "training": {**{k: _plain(t[k]) for k in _TRAIN_FIELDS if k in t},
                   "seed": int(g2_cfg.seed), "model_preset": g2_cfg.model.preset,
                   "image_size": int(g2_cfg.data.image_size),
                   "modalities": list(g2_cfg.data.modalities),
                   "diffusion_steps": int(g2_cfg.diffusion.num_steps)},
      "sampler": {k: _plain(v) for k, v in g2_cfg.sampler.to_dict().items()},
      "privacy_audit": privacy,
      "privacy_audit_note": privacy_note or (
          "no privacy audit was given" if privacy is None else "a privacy audit"),
  }


def _plain(v):
  return list(v) if isinstance(v, tuple) else v


def card_markdown(card: dict) -> str:
  """model_card.md: the card in a few lines a person reads."""
  d, p, w = card["data"], card["private_data"], card.get("weights", {})
  lines = [f"# Model card: {card['model']}", "", card["description"], "",
           f"- Weights: step {w.get('step')}, {w.get('num_params', 0):,} parameters, "
           f"params.npz sha256 `{w.get('params_sha256')}`",
           f"- Initialisation: {card['initialisation']}",
           f"- Regions: conditioned on `{card['regions']['conditioning']}`, loss on "
           f"`{card['regions']['loss']}`", "",
           "## Data", "",
           "| role | split | slices | cases | set fingerprint | content sha256 |",
           "|---|---|---|---|---|---|"]
  for e in d["tumor_examples"] + d["healthy_examples"]:
    fingerprint = f"`{e['set_fingerprint']}`" if e.get("set_fingerprint") else "-"
    lines.append(f"| {e['role']} | {e['split']} | {e['num_slices']} | {e['num_cases']} "
                 f"| {fingerprint} | `{e['content_sha256'][:16]}` |")
  lines += ["", "## Private data", "",
            f"Used: **{'yes' if p['used'] else 'no'}**. {p['statement']}",
            f"Enforced by `{p['guard']}`: {p['guard_rule']} "
            f"({p['inputs_checked']} inputs checked).", "",
            "## Modes", ""]
  lines += [f"- {k}: {v}" for k, v in card["modes"].items()]
  lines += ["", "## Training", "", "```json", json.dumps(card["training"], indent=1),
            "```", "", "## Sampler", "", "```json", json.dumps(card["sampler"], indent=1),
            "```", "", "## Privacy audit", ""]
  note = card.get("privacy_audit_note")
  lines.append((f"From {note}:\n\n" if note else "") + "```json\n" +
               json.dumps(card["privacy_audit"], indent=1) + "\n```"
               if card["privacy_audit"] is not None else
               f"None on this card: {note or 'no privacy audit was given'}.")
  return "\n".join(lines) + "\n"


def read_inputs(workdir: str) -> dict:
  path = os.path.join(workdir, INPUTS_FILE)
  record = stage_io.read_json(path)
  if record is None:
    raise model_io.ModelError(
        f"{path}: missing, so {workdir} is not a G2 training run (train it with "
        "launch.train_g2); only G2 is exported with a model card")
  return record


def export(config, workdir: str, out_dir: str, *, privacy_json: str | None = None,
           overwrite: bool = False, step: int | None = None) -> tuple[str, int]:
  """G2's EMA weights as an export with its model card; (out_dir, step).

  A finished export of this G2 (same public data) at `out_dir` at `step`
  (None: whatever step it holds) is kept: with no `privacy_json` as it is,
  card and audit included; with one, only its card is rewritten, and only
  when the audit it may carry (`audit_for_card`) changed (an audit that may
  not go on the card never removes one that passed for these weights). An export of this
  G2 at another step is replaced (the audit then goes on the card only if it
  measured no G2: these weights are new). Any other model folder there is
  refused unless `overwrite`.

  Raises:
    model_io.ModelError: `workdir` is not a G2 run, or has no checkpoint.
    errors.RunMismatch: `out_dir` holds another model's export.
  """
  record = read_inputs(workdir)
  old = None
  if os.path.exists(out_dir):
    card = model_io.read_card(out_dir) if model_io.is_export(out_dir) else None
    mine = card is not None and card.get("data", {}).get(
        "public_data_id") == record["public_data"]
    if not mine and not overwrite:
      raise errors.RunMismatch(
          f"{out_dir}: exists and is not an export of this G2 (whose "
          f"public data id is {record['public_data']}); pass overwrite "
          "(--overwrite) to replace it, or export elsewhere")
    if mine and not overwrite:
      old = (model_io.read_record(out_dir), card)
  g2 = g2_config(config, record["public_data"])
  if old is not None and step in (None, old[0]["step"]):
    weights, card = old
    if privacy_json is None:
      return out_dir, int(weights["step"])  # finished: kept, its card's audit too.
    privacy, note = audit_for_card(privacy_json, record, weights["params_sha256"])
    if privacy is None and card.get("privacy_audit") is not None:
      # The card's audit passed these checks for these weights: it stays
      # rather than give way to an audit that may not be on the card.
      logging.warning("G2's card keeps its privacy audit; %s", note)
    elif (card.get("privacy_audit"), card.get("privacy_audit_note")) != (privacy, note):
      model_io.replace_card(out_dir, model_card(g2, record, privacy, note),
                            card_markdown)
    return out_dir, int(weights["step"])
  privacy, note = audit_for_card(privacy_json, record, None)
  return model_io.export_workdir(workdir, g2, out_dir, overwrite=True,
                                 card=model_card(g2, record, privacy, note),
                                 card_markdown=card_markdown)


def check_card(card: dict | None, where: str) -> None:
  """Refuses a model folder whose card does not say G2 saw public data only."""
  if card is None or card.get("format") != CARD_FORMAT:
    raise model_io.ModelError(
        f"{where}: no G2 model card ({model_io.MODEL_CARD}); local synthesis runs "
        "only the shared model G2 (launch.train_g2's export)")
  if card.get("private_data", {}).get("used", True):
    raise model_io.ModelError(f"{where}: its model card does not state that no "
                              "private slice was used")
