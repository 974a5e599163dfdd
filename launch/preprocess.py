r"""Preprocess a BraTS folder into sharded 2D slices.

  python -m launch.preprocess --brats_dir=DIR --out_dir=OUT \
      [--config=configs/default.py] [--config.data.image_size=256 \
      --config.data.spatial=pad] [--num_workers=2] [--on_error=skip] \
      [--overwrite]

Writes OUT/tfrecord/ (tf.data), OUT/array_record/ (TF-free reader) with splits
<center>_train, <center>_test and healthy, and OUT/manifest.json last.
"""

from absl import app
from absl import flags
from absl import logging

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
_BRATS_DIR = flags.DEFINE_string("brats_dir", None, "BraTS training data folder "
                                 "(2018, 2019, 2020, 2021 or 2023 layout, nested "
                                 "or flat).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes for the "
                                    "per-case work.")
_ON_ERROR = flags.DEFINE_enum("on_error", None, ["raise", "skip"],
                              "Bad case: stop (raise) or skip and list it in "
                              "the manifest (skip). Default: config.data.on_error.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild a finished output.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["brats_dir", "out_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(brats_dir=_BRATS_DIR.value, out_dir=_OUT_DIR.value)
  from data_pipeline import preprocess  # pylint: disable=g-import-not-at-top
  cfg = flags.FLAGS.config.data.to_dict()
  if _ON_ERROR.value:
    cfg["on_error"] = _ON_ERROR.value
  # Bad settings, bad inputs and a finished output of another config are
  # errors.UserError: launch.common prints them as one line.
  manifest = preprocess.run(_BRATS_DIR.value, _OUT_DIR.value, cfg,
                            num_workers=_NUM_WORKERS.value,
                            overwrite=_OVERWRITE.value, progress=_PROGRESS.value)
  for name, split in manifest["splits"].items():
    logging.info("split %-16s %5d slices from %4d cases", name,
                 split["num_slices"], split["num_cases"])
  for skipped in manifest["skipped"]:
    logging.warning("skipped %s: %s", skipped["path"], skipped["reason"])
  common.print_artifacts("preprocessing done:", {
      "manifest": f"{_OUT_DIR.value}/manifest.json",
      **{f"{fmt} data set": f"{_OUT_DIR.value}/{path}"
         for fmt, path in manifest["formats"].items()},
  })


if __name__ == "__main__":
  app.run(main)
