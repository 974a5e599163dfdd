r"""Train the few-shot diffusion model (stage S2).

  python -m launch.train_diffusion --config=configs/demo.py --workdir=runs/demo/g1 \
      --data_dir=runs/demo/slices [--config.train.center=CBICA] \
      [--config.train.reader=tf|grain|synthetic] [--jax_distributed]

Data: the public `healthy` split (whole-image loss) and the private
`<center>_train` split (loss in the boundary ring), mixed per slot with
probability train.p_healthy. Checkpoints: WORKDIR/checkpoints (orbax, async);
metrics: WORKDIR/metrics.jsonl and WORKDIR/tensorboard/. Rerunning with the
same workdir resumes (train.num_steps, logging and checkpoint cadence may
change); a different model, diffusion, mask, data or training config is
refused, naming what differs (--overwrite starts over in the same workdir).
SIGTERM saves a checkpoint and exits cleanly.

Multi-host: pass --jax_distributed (or run under a launcher that sets the
coordinator environment, see launch/pod/); every process runs this same
command and reads its own shard of the data.
"""

import os

from absl import app
from absl import flags
from absl import logging

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Preprocessing output "
                                "(launch.preprocess --out_dir); not needed "
                                "with config.train.reader=synthetic.")
common.define_distributed_flags()
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Stop (with a checkpoint) "
                                "after this step.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the checkpoints, "
                               "metrics and TensorBoard events of another run "
                               "in --workdir (a different model, data or "
                               "training config) instead of refusing it.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from launch import train_data  # pylint: disable=g-import-not-at-top
  train_data.refuse_an_unread_data_dir(flags.FLAGS.config, _DATA_DIR.value)
  common.initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  logging.info("process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  sampler = train_data.make_sampler(config, _DATA_DIR.value)
  result = diffusion.train(config, _WORKDIR.value, sampler.batch,
                           stop_at=_STOP_AT.value, overwrite=_OVERWRITE.value)
  if jax.process_index() == 0:
    common.print_artifacts(
        f"diffusion training {'stopped' if result['preempted'] else 'done'} "
        f"at step {result['step']} (compile {result['compile_s']:.1f}s):", {
            "checkpoints": os.path.join(_WORKDIR.value, "checkpoints"),
            "metrics": os.path.join(_WORKDIR.value, "metrics.jsonl"),
            "tensorboard": os.path.join(_WORKDIR.value, "tensorboard"),
            "last metrics": result["metrics"],
        })


if __name__ == "__main__":
  app.run(main)
