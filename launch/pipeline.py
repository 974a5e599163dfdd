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

The next stages (baseline synthesis sets, evaluation, federated G1, G2,
local synthesis, privacy audit, report) are further entries of STAGES.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

from absl import logging


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


def train_g1(run: Run) -> dict:
  """G1: the diffusion model on the private center's slices + public healthy."""
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  from launch import train_data  # pylint: disable=g-import-not-at-top
  out = run.path("g1")
  sampler = train_data.make_sampler(run.config, run.path("slices"))
  result = diffusion.train(run.config, out, sampler.batch, overwrite=run.overwrite)
  logging.info("train G1: step %d, last metrics %s (compile %.1fs)", result["step"],
               result["metrics"], result["compile_s"])
  return {"G1 checkpoints": os.path.join(out, "checkpoints"),
          "G1 metrics": os.path.join(out, "metrics.jsonl"),
          "G1 step": result["step"], "G1 final loss": result["metrics"].get("loss")}


def export_g1(run: Run) -> dict:
  """G1's EMA weights as a self-contained export, redone when G1 moved on."""
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  out, step = run.path("model"), run.outputs["train G1"]["G1 step"]
  if not (model_io.is_export(out) and model_io.read_record(out)["step"] == step):
    _, step = model_io.export_workdir(run.path("g1"), run.config, out, overwrite=True)
  return {"G1 export": out, "G1 export step": step}


def synthesize(run: Run) -> dict:
  """The shareable synthetic set: private tumors in public healthy slices by G1."""
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  result = stage.run(run.config, run.workdir, slice_sets.SliceData(run.path("slices")),
                     model_dir=run.outputs["export G1"]["G1 export"],
                     overwrite=run.overwrite)
  return {**result["paths"], "synthetic pairs": result["synthetic_total"]}


STAGES = (
    Stage("phantom", phantom),
    Stage("preprocess", preprocess),
    Stage("train G1", train_g1),
    Stage("export G1", export_g1),
    Stage("synthesize", synthesize),
)


def run_stages(run: Run, stages=STAGES) -> dict:
  """Runs `stages` in order; returns every stage's artifacts (stage -> dict)."""
  for s in stages:
    start = time.perf_counter()
    logging.info("stage %s ...", s.name)
    run.outputs[s.name] = s.run(run)
    logging.info("stage %s: done in %.1fs", s.name, time.perf_counter() - start)
  return run.outputs
