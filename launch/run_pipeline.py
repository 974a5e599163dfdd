r"""The whole DFGM pipeline, stage after stage (the README's main job).

  python -m launch.run_pipeline --config=configs/demo.py --workdir=runs/demo
  python -m launch.run_pipeline --config=configs/default.py \
      --brats_dir=/data/MICCAI_BraTS2020_TrainingData --workdir=runs/brats20

Stages (each resumable; a finished stage is reused on rerun):
  S0 phantom     config.phantom -> WORKDIR/phantom (skipped with --brats_dir)
  S1 preprocess  -> WORKDIR/slices (TFRecord + ArrayRecord + manifest.json)
  S2 train G1    -> WORKDIR/g1 (orbax checkpoints, metrics.jsonl, tensorboard/)
  S3 export G1   -> WORKDIR/model (model.json + params.npz, self-contained)
  S4 synthesize  -> WORKDIR/synthetic (synthetic set, summary.json, comparison.png)
"""

import subprocess
import sys

import json
import os
import time

from absl import app
from absl import flags
from absl import logging

from launch import common

common.quiet_tensorflow()
common.define_config_flag("demo.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage "
                               "writes its artifacts.")
_BRATS_DIR = flags.DEFINE_string("brats_dir", None, "Real BraTS data; when "
                                 "unset the phantom of config.phantom is used.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Processes for the "
                                    "per-case stages.")


def stage_phantom(config, workdir: str) -> str:
  """S0: writes the phantom BraTS folder once; returns its data folder."""
  from data_pipeline import phantom  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "phantom")
  done = os.path.join(out, "phantom_done.json")
  params = config.phantom.to_dict()
  if os.path.exists(done):
    with open(done) as f:
      record = json.load(f)
    if record["params"] == params:
      logging.info("S0 phantom: reusing %s", record["data_dir"])
      return record["data_dir"]
  start = time.perf_counter()
  info = phantom.generate(out, version=params["version"],
                          num_cases=params["num_cases"], seed=params["seed"],
                          scale=params["scale"], num_workers=_NUM_WORKERS.value)
  logging.info("S0 phantom: %d cases in %.1fs -> %s", len(info.cases),
               time.perf_counter() - start, info.data_dir)
  with open(done + ".tmp", "w") as f:
    json.dump({"params": params, "data_dir": info.data_dir}, f)
  os.replace(done + ".tmp", done)  # written last: marks the stage complete.
  return info.data_dir


def stage_preprocess(config, brats_dir: str, workdir: str) -> dict:
  """S1: BraTS folder -> sharded slices."""
  from data_pipeline import preprocess  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "slices")
  start = time.perf_counter()
  manifest = preprocess.run(brats_dir, out, config.data.to_dict(),
                            num_workers=_NUM_WORKERS.value)
  logging.info("S1 preprocess: %s in %.1fs", {k: v["num_slices"] for k, v in
                                              manifest["splits"].items()},
               time.perf_counter() - start)
  return manifest


def stage_train(config, workdir: str) -> dict:
  """S2: trains the diffusion model G1 on the private center + public healthy."""
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  from launch import train_data  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "g1")
  sampler = train_data.make_sampler(config, os.path.join(workdir, "slices"))
  start = time.perf_counter()
  result = diffusion.train(config, out, sampler.batch)
  logging.info("S2 train G1: step %d, last metrics %s, in %.1fs (compile %.1fs)",
               result["step"], result["metrics"], time.perf_counter() - start,
               result["compile_s"])
  return result


def stage_export(config, workdir: str, step: int) -> str:
  """S3: G1's EMA weights as a self-contained export (re-exported when G1 moved on)."""
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "model")
  if model_io.is_export(out) and model_io.read_record(out)["step"] == step:
    logging.info("S3 export: reusing %s (step %d)", out, step)
    return out
  _, step = model_io.export_workdir(os.path.join(workdir, "g1"), config, out,
                                    overwrite=True)
  logging.info("S3 export: step %d -> %s", step, out)
  return out


def stage_synthesize(workdir: str, model_dir: str) -> dict:
  """S4: the synthesis binary, in its own process (its flags, its JAX state)."""
  overrides = [a for a in sys.argv[1:] if a.startswith("--config")]
  cmd = [sys.executable, "-m", "launch.synthesize", *overrides,
         f"--workdir={workdir}", f"--model_dir={model_dir}",
         f"--data_dir={os.path.join(workdir, 'slices')}"]
  start = time.perf_counter()
  subprocess.run(cmd, check=True)
  with open(os.path.join(workdir, "synthetic", "summary.json")) as f:
    summary = json.load(f)
  logging.info("S4 synthesize: %d pairs in %.1fs", summary["synthetic_total"],
               time.perf_counter() - start)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  workdir = _WORKDIR.value
  common.require_local(workdir=workdir, brats_dir=_BRATS_DIR.value)
  os.makedirs(workdir, exist_ok=True)
  brats_dir = _BRATS_DIR.value or stage_phantom(config, workdir)
  manifest = stage_preprocess(config, brats_dir, workdir)
  slices_dir = os.path.join(workdir, "slices")
  trained = stage_train(config, workdir)
  model_dir = stage_export(config, workdir, trained["step"])
  synthesized = stage_synthesize(workdir, model_dir)
  common.print_artifacts("pipeline done:", {
      "BraTS data": brats_dir,
      "slices manifest": os.path.join(slices_dir, "manifest.json"),
      **{f"slices ({fmt})": os.path.join(slices_dir, path)
         for fmt, path in manifest["formats"].items()},
      "splits": ", ".join(f"{k}={v['num_slices']}"
                          for k, v in manifest["splits"].items()),
      "G1 checkpoints": os.path.join(workdir, "g1", "checkpoints"),
      "G1 metrics": os.path.join(workdir, "g1", "metrics.jsonl"),
      "G1 final loss": trained["metrics"].get("loss"),
      "G1 export": model_dir,
      "synthetic set": os.path.join(workdir, "synthetic"),
      "synthetic pairs": synthesized["synthetic_total"],
      "comparison figure": synthesized["figure"],
  })


if __name__ == "__main__":
  app.run(main)
