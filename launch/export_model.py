r"""Export a trained diffusion model as a self-contained folder.

  python -m launch.export_model --model_dir=runs/demo/g1 --out=runs/demo/model

Reads the EMA weights of the newest readable checkpoint of a training
workdir (Denoiser.load; its own config defines the network, so no --config
is needed) and writes OUT/model.json and
OUT/params.npz (EMA weights, no pickles, sha256-checked on load; see
dfgm_jax/model_io.py). The folder holds no paths, data or patient
identifiers: it is what an institute shares. `launch.synthesize --model_dir=OUT`
and `launch.benchmark_sampler --config.bench.checkpoint_dir=OUT` read it.
"""

import os

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Training workdir (checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Export folder to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export.")
flags.mark_flags_as_required(["model_dir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(out=_OUT.value)  # --model_dir may be a bucket URL.
  from dfgm_jax import model_io  # pylint: disable=g-import-not-at-top
  if model_io.is_export(_MODEL_DIR.value):
    raise app.UsageError(f"{_MODEL_DIR.value} is already an export")
  # A ModelError (no readable checkpoint, another network) is the user's:
  # launch.common ends it with one line.
  out, step = model_io.export_workdir(_MODEL_DIR.value, flags.FLAGS.config, _OUT.value,
                                      overwrite=_OVERWRITE.value)
  record = model_io.read_record(out)
  common.print_artifacts(f"exported step {step} ({record['num_params']:,} parameters):", {
      "model": out, "description": os.path.join(out, model_io.MODEL_JSON),
      "params_sha256": record["params_sha256"]})


if __name__ == "__main__":
  app.run(main)
