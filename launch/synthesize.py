r"""Synthesize private tumors into public healthy slices with a trained model.

  python -m launch.synthesize --config=configs/demo.py --workdir=runs/demo \
      --model_dir=runs/demo/model --data_dir=runs/demo/slices

Writes the shareable synthetic set to WORKDIR/synthetic/ and the private state
(salt, figures with private images, staging) to WORKDIR/private/; see
dfgm_jax/synthesis/stage.py. A finished set is reused, one of another config
is refused (--overwrite replaces it), a stopped one resumes.

Multi-host: run the same command on every host (--jax_distributed or a
launcher environment, see launch/pod/); only process 0 needs WORKDIR.
"""

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
common.define_distributed_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output: WORKDIR/synthetic (shareable) "
                               "and WORKDIR/private.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Exported model folder "
                                 "(model.json) or training workdir (checkpoints/); "
                                 "EMA weights. Not needed for mode cutpaste.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Preprocessing output.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo a finished set, also one "
                               "made with another config or model.")
_STOP_AFTER = flags.DEFINE_integer("stop_after_batches", None, "Stop (staged, "
                                   "resumable) after generating this many batches.")
flags.mark_flags_as_required(["workdir", "data_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # --data_dir and --model_dir may be bucket URLs; the workdir is local.
  common.require_local(workdir=_WORKDIR.value)
  common.initialize_distributed()
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import stage  # pylint: disable=g-import-not-at-top
  result = stage.run(flags.FLAGS.config, _WORKDIR.value,
                     slice_sets.SliceData(_DATA_DIR.value), model_dir=_MODEL_DIR.value,
                     overwrite=_OVERWRITE.value, stop_after_batches=_STOP_AFTER.value)
  if not parallel.is_main():
    return
  if result["stopped"]:
    common.print_artifacts("synthesis stopped (staged; rerun to resume):", result["paths"])
  else:
    common.print_artifacts("synthesis reused:" if result["reused"] else "synthesis done:", {
        **result["paths"], "pairs": result["synthetic_total"],
        "images/s": result["images_per_s"]})


if __name__ == "__main__":
  app.run(main)
