r"""Trains and tests the segmenter on any mix of slice sets (one run).

  python -m launch.train_segmentation --config=configs/demo.py \
      --train=runs/demo/slices:CBICA_train,runs/demo/synthetic:CBICA_synthetic \
      --test=runs/demo/slices:CBICA_test --workdir=runs/my_run

Each set is DIR:SPLIT (a preprocessing output or a synthetic set and one of
its splits). Trains config.seg.seeds (resumes a stopped run) in WORKDIR/seg
and writes WORKDIR/results.json (Dice, HD95 per seed, mean and std). The
runs A-E of the paper are launch/evaluate.py.
"""

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
common.define_distributed_flags()
_TRAIN = flags.DEFINE_list("train", None, "Training sets: DIR:SPLIT,DIR:SPLIT,...")
_TEST = flags.DEFINE_string("test", None, "Test set (real slices): DIR:SPLIT.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's folder.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a run of another config.")
flags.mark_flags_as_required(["train", "test", "workdir"])


def _set(spec: str):
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  directory, sep, split = spec.rpartition(":")  # DIR may be a URL (gs://...).
  if not sep or not directory or not split:
    raise app.UsageError(f"{spec!r}: expected DIR:SPLIT")
  return slice_sets.SliceData(directory), split


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(workdir=_WORKDIR.value)
  common.initialize_distributed()
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dfgm_jax.eval import runs  # pylint: disable=g-import-not-at-top
  result = runs.train_one(flags.FLAGS.config, _WORKDIR.value,
                          [_set(s) for s in _TRAIN.value], _set(_TEST.value),
                          overwrite=_OVERWRITE.value)
  if parallel.is_main():
    common.print_artifacts("training stopped (rerun to resume):" if result["stopped"]
                           else f"segmentation done, mean Dice {result['mean']['dice']:.3f}:",
                           {"results": result["path"]})


if __name__ == "__main__":
  app.run(main)
