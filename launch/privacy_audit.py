r"""The privacy audit of a workdir's synthetic set and shared models (issue 14).

  python -m launch.privacy_audit --config=configs/demo.py --workdir=W \
      [--candidates=DIR:SPLIT] [--center=CBICA] [--out=W/privacy] [--overwrite]

Audits the candidates (default W/synthetic's <center>_synthetic split) against
the center's private training slices (W/slices, <center>_train), with every
threshold calibrated on its held-out slices (<center>_test): DCR, NN ratio,
Carlini's calibrated distance per region (full, ring, background, tumor; the
tumor is copied by design and reported so), source-ring replication,
membership inference against G1 (W/model) and G2 (W/g2_model) when exported,
the G2 sample test when W/local holds a generate-mode set, and a scan of what
would be shared (W/synthetic, W/g2_model, figure metadata) for case ids,
patient ids, paths and the salt.

`--candidates=W/slices:CBICA_train` audits the training split itself: it must
come out 100 % flagged (exact copies), a check that the audit sees copies.

Writes OUT (default W/privacy): privacy.json and privacy.md (PRIVATE),
summary.json (SHAREABLE: numbers and verdicts only), closest_pairs.png
(PRIVATE). A finished audit of the same inputs is reused; one of other inputs
is refused (--overwrite, or another --out). See dfgm_jax/privacy/audit.py.
"""

import os

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "The pipeline's workdir W.")
_CANDIDATES = flags.DEFINE_string(
    "candidates", None, "DIR:SPLIT of the set to audit (default: "
    "W/synthetic:<center>_synthetic); e.g. W/slices:CBICA_train.")
_CENTER = flags.DEFINE_string("center", None, "The audited center (default: "
                              "config.train.center).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: W/privacy).")
_MEMBERSHIP = flags.DEFINE_bool("membership", True, "Run membership inference "
                                "against G1 and G2 when their exports exist.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo a finished audit, also one "
                               "of other inputs.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.require_local(workdir=_WORKDIR.value)
  from data_pipeline import slice_sets  # pylint: disable=g-import-not-at-top
  from dfgm_jax.privacy import audit  # pylint: disable=g-import-not-at-top
  out = _OUT.value or os.path.join(_WORKDIR.value, "privacy")
  inputs = audit.workdir_inputs(flags.FLAGS.config, _WORKDIR.value, slice_sets.SliceData,
                                candidates=_CANDIDATES.value, center=_CENTER.value,
                                out_dir=out)
  result = audit.run(flags.FLAGS.config, inputs, out,
                     settings=audit.Settings(membership=_MEMBERSHIP.value),
                     overwrite=_OVERWRITE.value)
  for verdict in result["verdicts"].values():
    print(f"  [{verdict['status']}] {verdict['text']}")
  common.print_artifacts(
      f"privacy audit {'reused' if result['reused'] else 'done'}: overall "
      f"{result['overall']}", result["paths"])


if __name__ == "__main__":
  app.run(main)
