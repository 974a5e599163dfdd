"""The DFGM pipeline as an ordered list of named stages, run in one process.

Each stage is one call into the library or the data layer, reads what the
stages before it made (`Run.outputs`) and returns the artifacts it made
(name -> path or value). Every stage reuses its finished output (each stage's
own record, see dfgm_jax/stage_io.py) and refuses one of another config, so
a rerun of the pipeline redoes only what is missing.

Workdir W:
  W/phantom/     phantom BraTS data (skipped with real data)      private
  W/slices/      preprocessed slices, both formats                private
  W/g1/          G1 training run (checkpoints, metrics)           private
  W/model/       G1's export (trained on private slices)          private
  W/private/     salt, figures of private images, staging         private
  W/synthetic/   the synthetic set, summary, manifest             SHAREABLE
                 (W/private/synthetic instead, NOT shareable, when
                 data.healthy_include_private put private patients'
                 healthy slices in the memory bank)
  W/baselines/   per baseline mode: its set (set/, state/) and,   private
                 for anomalydiffusion, its own model (g1/, model/)
  W/g2/          G2's training run (public data only)             private
  W/g2_model/    G2's export with its model card                  SHAREABLE
  W/local/       center 2's local synthesis with G2 in its own     private
                 healthy slices (<center 2>_healthy of W/slices)
  W/eval/        segmentation runs, results, figures, quality      private
  W/privacy/     the privacy audit: privacy.json, privacy.md       private
                 (hits of private ids, per-slice indices), the
                 closest-pairs figure; summary.json only           SHAREABLE
                 (numbers and verdicts, no id or path; G2's card
                 copies it)
  W/report.md    the report of every stage (links private figures) private

config.decentralized turns on federated G1 (in place of central G1), G2
and local synthesis (all on in the demo, off in default.py). The privacy audit runs after the
evaluation and, when G2 is exported, puts its summary into G2's model card
(only the card is rewritten, params.npz untouched: G2 is trained before the
audit that measures it). Only a finished audit of this run's synthetic set
reaches the card (train/g2.py audit_for_card).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

from absl import logging

from dfgm_jax import compile_cache
from dfgm_jax import errors


@dataclasses.dataclass
class Run:
  """One pipeline run: its settings and what the stages made so far."""

  config: Any
  workdir: str
  brats_dir: str | None = None  # real BraTS data; None: the phantom stage makes some.
  num_workers: int = 2
  overwrite: bool = False
  outputs: dict = dataclasses.field(default_factory=dict)  # stage name -> result

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)


class Stopped(errors.UserError):
  """A stage stopped early (preemption); a rerun of the pipeline resumes it."""


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable[[Run], dict]  # -> artifacts: name -> path or value
  doc: str = ""


def phantom(run: Run) -> dict:
  """Phantom BraTS data of config.phantom, unless real data was given."""
  if run.brats_dir:
    return {"BraTS data": run.brats_dir}
  from data_pipeline import phantom as phantom_lib  # pylint: disable=g-import-not-at-top
  run.brats_dir = phantom_lib.run(run.config.phantom.to_dict(), run.path("phantom"),
                                  num_workers=run.num_workers, overwrite=run.overwrite)
  return {"BraTS data": run.brats_dir}


def preprocess(run: Run) -> dict:
  """BraTS folder -> sharded 2D slices (both formats) + manifest.json."""
  from data_pipeline import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  out = run.path("slices")
  manifest = preprocess_lib.run(run.brats_dir, out, run.config.data.to_dict(),
                                num_workers=run.num_workers, overwrite=run.overwrite)
  return {"slices manifest": os.path.join(out, "manifest.json"),
          **{f"slices ({fmt})": os.path.join(out, path)
             for fmt, path in manifest["formats"].items()},
          "splits": ", ".join(f"{k}={v['num_slices']}"
                              for k, v in manifest["splits"].items())}


def _train(config, slices_dir: str, out: str, overwrite: bool, name: str) -> dict:
  """Trains a diffusion model of `config` in `out` (resumed; refused if another run's)."""
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  from launch import train_data  # pylint: disable=g-import-not-at-top
  sampler = train_data.make_sampler(config, slices_dir)
  result = diffusion.train(config, out, sampler.batch, overwrite=overwrite)
  if result["preempted"]:  # else the next stages would export a half-trained model.
    raise Stopped(f"training {name} stopped by a preemption; rerun to resume")
  logging.info("train %s: step %d, last metrics %s (compile %.1fs)", name, result["step"],
               result["metrics"], result["compile_s"])
  return result


def _export(config, train_dir: str, out: str, step: int) -> int:
  """The EMA weights of `train_dir` as a self-contained export, redone when training moved on."""
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  if not (model_io.is_export(out) and model_io.read_record(out)["step"] == step):
    _, step = model_io.export_workdir(train_dir, config, out, overwrite=True)
  return step


def _decentralized(config, field: str):
  """config.decentralized.<field> (off when the config has no such section)."""
  section = config.get("decentralized")
  return section.get(field) if section is not None else None


def train_g1(run: Run) -> dict:
  """G1: the diffusion model on the private center's slices + public healthy;
  with config.decentralized.federated_g1, FedAvg over config.fed.centers
  (the in-job engine; the export reads its global EMA alike)."""
  out = run.path("g1")
  if _decentralized(run.config, "federated_g1"):
    from dfgm_jax.train import federated  # pylint: disable=g-import-not-at-top
    from launch import train_data  # pylint: disable=g-import-not-at-top
    clients = train_data.make_clients(run.config, run.path("slices"))
    result = federated.train(run.config, out, clients, overwrite=run.overwrite)
    if result["preempted"]:
      raise Stopped("federated G1 stopped by a preemption; rerun to resume")
    logging.info("train G1 federated: %d rounds, step %d, clients %s", result["rounds"],
                 result["step"], [c.name for c in clients])
  else:
    result = _train(run.config, run.path("slices"), out, run.overwrite, "G1")
  return {"G1 checkpoints": os.path.join(out, "checkpoints"),
          "G1 metrics": os.path.join(out, "metrics.jsonl"),
          "G1 step": result["step"], "G1 final loss": result["metrics"].get("loss")}


def export_g1(run: Run) -> dict:
  """G1's EMA weights as a self-contained export, redone when G1 moved on."""
  out = run.path("model")
  step = _export(run.config, run.path("g1"), out, run.outputs["train G1"]["G1 step"])
  return {"G1 export": out, "G1 export step": step}


def synthesize(run: Run) -> dict:
  """The shareable synthetic set: private tumors in public healthy slices by G1."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  result = stage.run(run.config, run.workdir, slice_sets.SliceData(run.path("slices")),
                     model_dir=run.outputs["export G1"]["G1 export"],
                     overwrite=run.overwrite)
  return {**result["paths"], "synthetic pairs": result["synthetic_total"]}


# --- The evaluation's baselines (ALGORITHM.md 8), all private -------------------

AD = "anomalydiffusion"


def baselines(config) -> tuple[str, ...]:
  """The baseline sets config.evaluation asks for (none without the section)."""
  evaluation = config.get("evaluation")
  return tuple(evaluation.baselines) if evaluation is not None else ()


def baseline_config(config, mode: str):
  """`config` for the baseline `mode`: its synthesis mode and, for
  anomalydiffusion, its own model's regions (conditioned on and trained on
  the dilated tumor, ALGORITHM.md 8). Everything else, G1's training budget
  included, stays G1's: the comparison is fair."""
  config = config.copy_and_resolve_references()
  config.synthesis.mode = mode
  if mode == AD:
    config.mask.region = "dilated"
    config.train.loss_region = "dilated"
  return config


def train_baseline_model(run: Run) -> dict:
  """The anomalydiffusion baseline's own model, trained and exported like G1."""
  if AD not in baselines(run.config):
    return {}
  config = baseline_config(run.config, AD)
  root = run.path("baselines", AD)
  result = _train(config, run.path("slices"), os.path.join(root, "g1"), run.overwrite,
                  f"the {AD} model")
  step = _export(config, os.path.join(root, "g1"), os.path.join(root, "model"),
                 result["step"])
  return {f"{AD} model": os.path.join(root, "model"), f"{AD} model step": step,
          f"{AD} final loss": result["metrics"].get("loss")}


def synthesize_baselines(run: Run) -> dict:
  """The baseline synthetic sets (W/baselines/<mode>/set) for runs B_<mode>, D_<mode>."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  out = {}
  for mode in baselines(run.config):
    model_dir = run.outputs["train baseline model"].get(f"{AD} model") if mode == AD else None
    result = stage.run(baseline_config(run.config, mode), run.workdir,
                       slice_sets.SliceData(run.path("slices")), model_dir=model_dir,
                       baseline=True, overwrite=run.overwrite)
    out[f"{mode} set"] = result["paths"]["synthetic set"]
    out[f"{mode} pairs"] = result["synthetic_total"]
  return out


# --- The shared model G2 and local synthesis (ALGORITHM.md 6), opt-in -----------


def _not_shareable(synthetic_dir: str) -> str:
  """Why the synthetic set may not be shared ('' when it may)."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax import provenance  # pylint: disable=g-import-not-at-top
  shareable, why = provenance.set_shareable(slice_sets.load_manifest(synthetic_dir))
  return "" if shareable else why


def train_g2(run: Run) -> dict:
  """G2: fresh, on the public synthetic set and the healthy slices only; its
  export (W/g2_model) carries the model card. The shareable model. Skipped,
  and said so, when the synthetic set is not shareable (G2's guard would
  refuse it)."""
  if not _decentralized(run.config, "g2"):
    return {}
  from launch import public_data  # pylint: disable=g-import-not-at-top
  synthetic = run.outputs["synthesize"]["synthetic set"]
  why = _not_shareable(synthetic)
  if why:
    logging.warning("G2 skipped: the synthetic set is not shareable: %s", why)
    return {"G2": f"skipped: the synthetic set is not shareable ({why})"}
  privacy = run.path("privacy", "privacy.json")
  result = public_data.train_and_export(
      run.config, run.path("g2"), run.path("g2_model"), run.path("slices"),
      [synthetic],
      privacy_json=privacy if os.path.exists(privacy) else None,
      overwrite=run.overwrite, progress=True)
  if result["preempted"]:
    raise Stopped("G2 training stopped by a preemption; rerun to resume")
  return {"G2 export (SHAREABLE)": run.path("g2_model"), "G2 step": result["step"],
          "G2 final loss": result["metrics"].get("loss")}


def local_healthy_split(config, real) -> str:
  """Center 2's own healthy split (<center 2>_healthy: its training patients'
  healthy slices) when the slices have it, else the public `healthy` split."""
  from dfgm_jax import provenance  # pylint: disable=g-import-not-at-top
  from dfgm_jax.eval import runs  # pylint: disable=g-import-not-at-top
  names = runs.centers(config, real)
  if len(names) > 1:
    own = names[1] + provenance.CENTER_HEALTHY_SUFFIX
    if real.manifest.get("splits", {}).get(own, {}).get("num_slices"):
      return own
  return provenance.HEALTHY


def local_synthesis(run: Run) -> dict:
  """Center 2's own synthetic set from G2's export alone (W/local/synthetic):
  the published tumors of center 1 in center 2's own healthy slices, by G2."""
  mode = _decentralized(run.config, "local_synthesis")
  if not mode:
    return {}
  model_dir = run.outputs.get("train G2", {}).get("G2 export (SHAREABLE)")
  if not model_dir:
    logging.warning("local synthesis skipped: no G2 export")
    return {"local synthesis": "skipped: no G2 export"}
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import local  # pylint: disable=g-import-not-at-top
  real = slice_sets.SliceData(run.path("slices"))
  split = local_healthy_split(run.config, real)
  result = local.run(run.config, run.path("local"), real,
                     slice_sets.SliceData(run.outputs["synthesize"]["synthetic set"]),
                     model_dir=model_dir, mode=mode,
                     k=_decentralized(run.config, "local_k"), healthy_split=split,
                     overwrite=run.overwrite)
  return {"local synthetic set": result["paths"]["synthetic set"],
          "local healthy split": split, "local pairs": result["synthetic_total"]}


# --- Evaluation and report ------------------------------------------------------


def evaluation_sets(workdir: str, config, *, data_dir: str | None = None,
                    synthetic_dir: str | None = None, modes=None,
                    local_dir: str | None = None) -> tuple[Any, dict]:
  """The real slices and the synthetic sets (name -> SliceData, None when
  missing: its runs are skipped and listed) that the evaluation compares.

  Defaults: W/slices, W/synthetic (dfgm; W/private/synthetic when only that
  one exists) and W/baselines/<mode>/set for each
  mode of `modes` (default config.evaluation.baselines); `local_dir`, center
  2's local synthesis with G2 (launch.synthesize_local's W2/synthetic), adds
  run D_local. Only a missing default is skipped: a set the caller named
  (`data_dir`, `synthetic_dir`, `modes`, `local_dir`) that is missing is a
  UserError naming its flag.
  """
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax.eval import runs  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  # name -> (folder, the flag that named it; None for a default).
  dirs = {runs.DFGM: (synthetic_dir, "--synthetic_dir") if synthetic_dir
          else (stage.synthetic_dir(workdir), None)}
  for mode in baselines(config) if modes is None else modes:
    dirs[mode] = (stage.layout(workdir, mode)["shared"],
                  None if modes is None else "--baselines")
  if local_dir:
    dirs[runs.LOCAL] = (local_dir, "--local_dir")
  synthetic = {}
  for name, (path, flag) in dirs.items():
    data = slice_sets.SliceData(path)
    try:
      data.manifest  # pylint: disable=pointless-statement
    except errors.UserError as e:
      if flag:  # a set the user named is an error; a missing default is skipped.
        raise errors.UserError(f"{flag}: {name}'s set: {e}") from None
      data = None
    synthetic[name] = data
  real = slice_sets.SliceData(data_dir or os.path.join(workdir, "slices"))
  if data_dir:
    try:
      real.manifest  # pylint: disable=pointless-statement
    except errors.UserError as e:
      raise errors.UserError(f"--data_dir: {e}") from None
  return real, synthetic


def evaluate(run: Run) -> dict:
  """Segmentation runs A-E, B_<mode>, D_<mode>: does the synthetic data help?"""
  from dfgm_jax.eval import runs  # pylint: disable=g-import-not-at-top
  local_dir = run.outputs.get("local synthesis", {}).get("local synthetic set")
  real, synthetic = evaluation_sets(run.workdir, run.config, local_dir=local_dir)
  result = runs.run(run.config, run.workdir, real, synthetic, overwrite=run.overwrite)
  if result["stopped"]:
    raise Stopped("evaluation stopped by a preemption; rerun to resume")
  gains = {f"Dice gain {k}": runs.gain_summary(g) for k, g in result["gains"].items()}
  return {"evaluation results": result["paths"]["results_md"], **gains}


def synthesis_quality(run: Run) -> dict:
  """Seam, tumor preservation, realism and diversity of every synthetic set."""
  from dfgm_jax.eval import quality_report  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  real, synthetic = evaluation_sets(run.workdir, run.config)
  result = quality_report.run(run.config, run.workdir, real, synthetic,
                              salt=stage.read_salt(run.workdir),
                              overwrite=run.overwrite)
  return {"quality": result["path"]}


def privacy_audit(run: Run) -> dict:
  """Memorization, membership and shared-file checks of train.center's set
  (W/privacy); skipped, and said so, when the center has no held-out slices."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax.privacy import audit  # pylint: disable=g-import-not-at-top
  out = run.path("privacy")
  try:
    inputs = audit.workdir_inputs(run.config, run.workdir, slice_sets.SliceData,
                                  out_dir=out)
    result = audit.run(run.config, inputs, out, overwrite=run.overwrite)
  except audit.NoHeldOut as e:
    logging.warning("privacy audit skipped: %s", e)
    return {"privacy audit": f"skipped: {e}"}
  _card_follows_audit(run, result["paths"]["privacy.json"])
  return {"privacy audit": result["overall"], "privacy report": result["paths"]["privacy.md"],
          "privacy summary (SHAREABLE)": result["paths"]["summary.json (SHAREABLE)"]}


def _card_follows_audit(run: Run, privacy_json: str) -> None:
  """G2's card gets this audit's summary (its weights untouched) when the
  audit is finished, of the synthetic set G2 was trained on, and measured
  these weights (train/g2.py audit_for_card); else the card says why not."""
  if not _decentralized(run.config, "g2") or not os.path.isdir(run.path("g2_model")):
    return
  from dfgm_jax.train import g2  # pylint: disable=g-import-not-at-top
  g2.export(run.config, run.path("g2"), run.path("g2_model"), privacy_json=privacy_json)


def write_report(run: Run) -> dict:
  """W/report.md: the tables and figures of every stage, one explanation each."""
  from dfgm_jax import report  # pylint: disable=g-import-not-at-top
  from dfgm_jax.eval import quality_report  # pylint: disable=g-import-not-at-top
  return {"report": report.write(run.workdir, quality_table=quality_report.table)}


STAGES = (
    Stage("phantom", phantom),
    Stage("preprocess", preprocess),
    Stage("train G1", train_g1),
    Stage("export G1", export_g1),
    Stage("synthesize", synthesize),
    Stage("train baseline model", train_baseline_model),
    Stage("synthesize baselines", synthesize_baselines),
    Stage("train G2", train_g2),
    Stage("local synthesis", local_synthesis),
    Stage("evaluate", evaluate),
    Stage("synthesis quality", synthesis_quality),
    Stage("privacy audit", privacy_audit),
    Stage("report", write_report),
)


def check_synthesized_center(config) -> None:
  """Refuses, before any stage, a synthesized center that the evaluation won't read.

  Runs B, D and E read center 1's synthetic split (the first of
  config.data.centers, dfgm_jax/eval/runs.py: centers), and synthesis makes
  the splits of synthesis.centers or train.center. When they differ, every
  stage runs and the evaluation then skips B, D and E (no
  '<center 1>_synthetic'). With data.centers 'auto' or 'all', center 1 is
  known only from the data: not checked here.
  """
  data, syn = config.get("data"), config.get("synthesis")
  spec = str(data.get("centers", "auto")) if data is not None else "auto"
  if spec in ("auto", "all") or "train" not in config:
    return
  first = [c.strip() for c in spec.split(",") if c.strip()][0]
  made = str((syn.get("centers") if syn is not None else "") or config.train.center)
  field = "synthesis.centers" if syn is not None and syn.get("centers") else "train.center"
  if first not in [c.strip() for c in made.split(",")]:
    raise errors.ConfigError(
        f"config.{field}={made}: the evaluation's runs B, D and E read center 1's "
        f"synthetic set ({first}_synthetic, the first of config.data.centers={spec}); "
        f"synthesize {first} (set config.{field}) or put {made} first in data.centers")


def run_stages(run: Run, stages=STAGES) -> dict:
  """Runs `stages` in order; returns every stage's artifacts (stage -> dict).

  The stages share one compiled-program cache in W/private/xla_cache
  (dfgm_jax/compile_cache.py): the evaluation's runs, the samplers and a
  rerun compile each program once.
  """
  if any(s.name == "evaluate" for s in stages):
    check_synthesized_center(run.config)
  with compile_cache.enabled(run.path("private", "xla_cache")):
    for s in stages:
      start = time.perf_counter()
      logging.info("stage %s ...", s.name)
      run.outputs[s.name] = s.run(run)
      logging.info("stage %s: done in %.1fs", s.name, time.perf_counter() - start)
  return run.outputs
