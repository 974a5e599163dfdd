r"""Writes a synthetic BraTS-format training folder (the phantom stage).

Example:
  python -m launch.make_phantom --out_dir=/tmp/phantom --version=2020 \
      --num_cases=12

Prints the data folder to preprocess. A rerun with the same flags reuses the
folder; other flags on a finished folder are refused unless --overwrite.
"""

import time

from absl import app
from absl import flags
from absl import logging

from data_pipeline import brats
from data_pipeline import phantom
from launch import common

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the data folder.",
                               required=True)
_VERSION = flags.DEFINE_enum("version", "2020", list(brats.VERSIONS),
                             "BraTS layout: naming, labels and csv files.")
_NUM_CASES = flags.DEFINE_integer("num_cases", 8, "Number of cases.")
_SEED = flags.DEFINE_integer("seed", 0, "Generation seed.")
_COMPRESSED = flags.DEFINE_bool("compressed", True,
                                ".nii.gz files (official release) or .nii (Kaggle).")
_KAGGLE_NESTING = flags.DEFINE_bool(
    "kaggle_nesting", False,
    "2020 only: nest the data folder in BraTS2020_TrainingData/ like Kaggle.")
_QUIRK_355 = flags.DEFINE_bool(
    "quirk_355", False,
    "2020 only: include case 355 with the Kaggle copy's seg file name.")
_SCALE = flags.DEFINE_float("scale", 1.0,
                            "Grid scale in (0, 1]; < 1 writes coarser volumes.")
_FULL_MAPPING = flags.DEFINE_bool(
    "full_mapping", False, "2020 only: write all 369 name_mapping.csv rows.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1,
                                    "Processes generating cases in parallel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished phantom "
                               "of other parameters in --out_dir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(out_dir=_OUT_DIR.value)  # written with os calls.
  params = {"version": _VERSION.value, "num_cases": _NUM_CASES.value,
            "seed": _SEED.value, "scale": _SCALE.value,
            "compressed": _COMPRESSED.value,
            "kaggle_nesting": _KAGGLE_NESTING.value,
            "quirk_355": _QUIRK_355.value, "full_mapping": _FULL_MAPPING.value}
  start = time.perf_counter()
  data_dir = phantom.run(params, _OUT_DIR.value, num_workers=_NUM_WORKERS.value,
                         overwrite=_OVERWRITE.value)
  logging.info("phantom ready in %.1fs", time.perf_counter() - start)
  print(data_dir)


if __name__ == "__main__":
  app.run(main)
