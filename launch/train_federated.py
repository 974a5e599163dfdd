r"""Train G1 federated, all centers' clients in this one job (in-job engine).

  python -m launch.train_federated --config=configs/demo.py --workdir=runs/demo/g1 \
      --data_dir=runs/demo/slices [--config.fed.centers=CBICA,TCIA] \
      [--config.fed.engine=auto|stacked|sequential] [--stop_after_rounds=N]

FedAvg (ALGORITHM.md 6): every round each client (a private center,
config.fed.centers, default every private center of the slices) starts
from the global parameters and EMA, trains config.fed.local_steps steps on
its <center>_train slices mixed with the public healthy split, keeping its
own optimizer state; the server averages parameters and EMA weighted by the
clients' private slice counts. The K clients' updates run as one vmapped
program per dispatch (stacked: the CPU default) or one after another
(sequential: the GPU default, and the CPU's when stacked does not fit the
memory); config.fed.engine chooses.

Outputs: WORKDIR/checkpoints (orbax, one per round, step = rounds x
local_steps, with every client's optimizer state), WORKDIR/metrics.jsonl
(one row per round, per-client columns '<center>/loss', ...),
WORKDIR/tensorboard/. A rerun with the same workdir resumes after the last
finished round (config.fed.rounds may grow); another run's workdir is
refused (--overwrite starts over). `launch.export_model --model_dir=WORKDIR`
exports the global EMA. Data for research runs with every center's slices in
one place; hospitals on their own machines run the Flower app instead.
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
_STOP_AFTER_ROUNDS = flags.DEFINE_integer(
    "stop_after_rounds", None, "Stop (with a checkpoint) after this many "
    "rounds, as if killed; a rerun resumes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the checkpoints, "
                               "metrics and TensorBoard events of another run "
                               "in --workdir instead of refusing it.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from launch import train_data  # pylint: disable=g-import-not-at-top
  train_data.refuse_an_unread_data_dir(flags.FLAGS.config, _DATA_DIR.value)
  import jax  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import federated  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  logging.info("%d local devices (%s)", jax.local_device_count(),
               jax.devices()[0].platform)
  clients = train_data.make_clients(config, _DATA_DIR.value)
  result = federated.train(config, _WORKDIR.value, clients,
                           stop_after_rounds=_STOP_AFTER_ROUNDS.value,
                           overwrite=_OVERWRITE.value)
  round_s = result["round_s"]
  common.print_artifacts(
      f"federated training {'stopped' if result['preempted'] else 'done'} "
      f"after round {result['rounds']} of {config.fed.rounds} "
      f"({len(clients)} clients, {result['engine']}, compile "
      f"{result['compile_s']:.1f}s"
      + (f", {sum(round_s) / len(round_s):.1f}s per round" if round_s else "")
      + "):", {
          "checkpoints": os.path.join(_WORKDIR.value, "checkpoints"),
          "metrics": os.path.join(_WORKDIR.value, "metrics.jsonl"),
          "clients": {c.name: c.num_examples for c in clients},
          "last metrics": result["metrics"],
      })


if __name__ == "__main__":
  app.run(main)
