r"""Train the shared model G2 on public data only, and export it with its model card.

  python -m launch.train_g2 --config=configs/demo.py --workdir=runs/demo/g2 \
      --synthetic_dir=runs/demo/synthetic [--synthetic_dir=OTHER/synthetic ...] \
      --healthy_dir=runs/demo/slices --out=runs/demo/g2_model \
      [--privacy_json=runs/demo/privacy/privacy.json]

Data: every <center>_synthetic split of each --synthetic_dir (the published
synthetic sets of all centers: tumor examples, loss on the dilated region)
and the `healthy` split of --healthy_dir (whole-image loss), mixed per slot
with probability train.p_healthy. Any other split among the inputs (a
<center>_train or _test, a real split other than healthy) is refused before
anything is read (dfgm_jax/train/g2.py check_public). G2 starts from fresh
weights (config.seed), never from G1; config.g2 (optional) overrides
config.train fields for G2 only.

Writes WORKDIR (checkpoints, metrics, g2_inputs.json; a rerun resumes) and
OUT: model.json, params.npz, model_card.json and model_card.md (what G2 saw:
counts and content hashes of its inputs; that no private slice was used; the
training and sampler settings; the privacy audit's summary when
--privacy_json is a finished audit of a synthetic set G2 was trained on that
measured these weights, else why there is none). A rerun whose training is
finished keeps OUT as it is (its card's audit too); a new --privacy_json
rewrites only the card. OUT is what an institute needs for
launch.synthesize_local. Single process (G2 is trained centrally).
"""

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "G2's training workdir (checkpoints, "
                               "metrics); not G1's.")
_SYNTHETIC = flags.DEFINE_multi_string("synthetic_dir", None, "A published synthetic "
                                       "set (launch.synthesize's WORKDIR/synthetic); "
                                       "repeat for the sets of several centers.")
_HEALTHY = flags.DEFINE_string("healthy_dir", None, "Preprocessing output whose public "
                               "`healthy` split G2 trains on (no other split is read).")
_OUT = flags.DEFINE_string("out", None, "Export folder to write (model and card).")
_PRIVACY = flags.DEFINE_string("privacy_json", None, "The privacy audit's privacy.json; "
                               "its summary goes into the card when that audit is "
                               "finished, of a synthetic set G2 was trained on, and "
                               "measured these weights (or no G2).")
_STOP_AT = flags.DEFINE_integer("stop_at", None, "Stop (with a checkpoint) after this "
                                "step; the export follows the checkpoint.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over in WORKDIR and replace "
                               "whatever is at OUT.")
flags.mark_flags_as_required(["workdir", "synthetic_dir", "healthy_dir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(workdir=_WORKDIR.value, out=_OUT.value)
  from launch import public_data  # pylint: disable=g-import-not-at-top
  result = public_data.train_and_export(
      flags.FLAGS.config, _WORKDIR.value, _OUT.value, _HEALTHY.value, _SYNTHETIC.value,
      privacy_json=_PRIVACY.value, overwrite=_OVERWRITE.value, stop_at=_STOP_AT.value)
  title = (f"G2 training {'stopped' if result['preempted'] else 'done'} at step "
           f"{result['step']} (compile {result['compile_s']:.1f}s), on "
           f"{result['tumor slices']} synthetic tumor and {result['healthy slices']} "
           "healthy slices:")
  common.print_artifacts(title, {
      k: result[k] for k in ("export", "card", "metrics") if k in result})


if __name__ == "__main__":
  app.run(main)
