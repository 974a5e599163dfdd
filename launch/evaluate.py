r"""Segmentation runs A-E: does the synthetic data help? (dfgm_jax/eval/runs.py)

  python -m launch.evaluate --config=configs/demo.py --workdir=runs/demo

Trains the segmenter (config.seg) on real and real + synthetic slices (the
dfgm set and the baseline sets of config.evaluation.baselines, or
--baselines) and tests it on real test slices; writes WORKDIR/eval/
results.json and results.md. Finished runs are reused; runs of another config are refused
(--overwrite redoes them). Runs whose inputs are missing are skipped and
listed.
"""

import os

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
common.define_distributed_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Writes WORKDIR/eval.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Real slices; default WORKDIR/slices.")
_SYNTHETIC_DIR = flags.DEFINE_string("synthetic_dir", None, "The dfgm synthetic set; "
                                     "default WORKDIR/synthetic.")
_BASELINES = flags.DEFINE_list("baselines", None, "Baseline sets to compare "
                               "(runs B_<mode>, D_<mode>); default "
                               "config.evaluation.baselines. Each is read from "
                               "WORKDIR/baselines/<mode>/set.")
_LOCAL_DIR = flags.DEFINE_string("local_dir", None, "Center 2's local synthesis "
                                 "with G2 (launch.synthesize_local's "
                                 "WORKDIR/synthetic): adds run D_local.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo runs made with another config.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(workdir=_WORKDIR.value)
  common.initialize_distributed()
  from dfgm_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dfgm_jax.eval import runs  # pylint: disable=g-import-not-at-top
  from launch import pipeline  # pylint: disable=g-import-not-at-top
  real, synthetic = pipeline.evaluation_sets(
      _WORKDIR.value, flags.FLAGS.config, data_dir=_DATA_DIR.value,
      synthetic_dir=_SYNTHETIC_DIR.value, modes=_BASELINES.value,
      local_dir=_LOCAL_DIR.value)
  # Every run and seed trains one program: compile it once (as run_pipeline).
  with compile_cache.enabled(os.path.join(_WORKDIR.value, "private", "xla_cache")):
    result = runs.run(flags.FLAGS.config, _WORKDIR.value, real, synthetic,
                      overwrite=_OVERWRITE.value)
  if parallel.is_main():
    common.print_artifacts("evaluation stopped (rerun to resume):" if result["stopped"]
                           else "evaluation done:", {
                               **{k: result["paths"][k] for k in ("results_json", "results_md")},
                               "trained": result["trained"], "reused": result["reused"]})


if __name__ == "__main__":
  app.run(main)
