r"""The whole DFGM pipeline, stage after stage, in this process (the README's main job).

  python -m launch.run_pipeline --config=configs/demo.py --workdir=runs/demo
  python -m launch.run_pipeline --config=configs/default.py \
      --brats_dir=/data/MICCAI_BraTS2020_TrainingData --workdir=runs/brats20

Stages (launch/pipeline.py: STAGES), each reused when finished and resumed
when interrupted: phantom (skipped with --brats_dir) -> preprocess ->
train G1 -> export G1 -> synthesize -> train baseline model -> synthesize
baselines -> evaluate -> report. Ends by printing the path of
WORKDIR/report.md. WORKDIR/synthetic is the shareable part; everything else
under WORKDIR is private.
"""

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("demo.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where every stage "
                               "writes its artifacts.")
_BRATS_DIR = flags.DEFINE_string("brats_dir", None, "Real BraTS data; when "
                                 "unset the phantom of config.phantom is used.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Processes for the "
                                    "per-case stages.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo every stage, replacing "
                               "outputs made with another config.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(workdir=_WORKDIR.value, brats_dir=_BRATS_DIR.value)
  from launch import pipeline  # pylint: disable=g-import-not-at-top
  outputs = pipeline.run_stages(pipeline.Run(
      flags.FLAGS.config, _WORKDIR.value, brats_dir=_BRATS_DIR.value,
      num_workers=_NUM_WORKERS.value, overwrite=_OVERWRITE.value))
  common.print_artifacts("pipeline done:", {
      name: value for artifacts in outputs.values() for name, value in artifacts.items()})
  print(f"report: {outputs['report']['report']}")


if __name__ == "__main__":
  app.run(main)
