r"""Measures BraTS cases (volume_stats) and compares two sets, e.g. phantom vs real.

  python -m launch.phantom_stats --brats_dir=<real BraTS folder> \
      --out=runs/stats/real.json
  python -m launch.phantom_stats --phantom_cases=4 \
      --reference=runs/stats/real.json --out=runs/stats/phantom.json

--brats_dir measures a folder; --phantom_cases instead generates that many
phantom cases with the phantom's default data parameters (BraTS 2020 layout,
seed 0, full grid; data_pipeline/phantom.py) in --phantom_dir and measures
them. --reference (a JSON this binary wrote, or a BraTS folder) adds the
comparison: for each statistic, the measured set's median against the
reference's range. The JSON holds the per-case rows, their summary (median,
quartiles, range per statistic) and the comparison; a table is printed.
"""

import json
import os
import tempfile

from absl import app
from absl import flags
from absl import logging

from launch import common
from data_pipeline import phantom
from data_pipeline import volume_stats
from dfgm_jax import errors
from dfgm_jax import stage_io

_BRATS_DIR = flags.DEFINE_string("brats_dir", None, "BraTS folder to measure.")
_PHANTOM_CASES = flags.DEFINE_integer(
    "phantom_cases", None, "Instead of --brats_dir: generate and measure this "
    "many phantom cases (2020 layout, seed 0, full grid).")
_PHANTOM_DIR = flags.DEFINE_string("phantom_dir", None, "Where --phantom_cases "
                                   "writes the phantom; default a temporary folder.")
_REFERENCE = flags.DEFINE_string("reference", None, "A JSON of this binary or "
                                 "a BraTS folder to compare with.")
_MAX_CASES = flags.DEFINE_integer("max_cases", None, "Measure at most this "
                                  "many cases of each folder.")
_OUT = flags.DEFINE_string("out", None, "Writes the JSON here.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes generating "
                                    "the phantom.")


def _measure(brats_dir):
  cases = volume_stats.measure_folder(
      brats_dir, _MAX_CASES.value,
      progress=lambda case_id, s: logging.info("measured %s (%.1fs)", case_id, s))
  return {"source": os.path.abspath(brats_dir), "cases": cases,
          "summary": volume_stats.summarise(volume_stats.numeric_rows(cases))}


def _reference(path):
  if os.path.isfile(path):
    record = stage_io.read_json(path)
    if not isinstance(record, dict) or "summary" not in record:
      raise errors.UserError(f"--reference={path}: not a JSON of launch.phantom_stats")
    return record
  if os.path.isdir(path):
    return _measure(path)
  raise errors.UserError(f"--reference={path}: no such file or folder")


def _table(result) -> str:
  comparison = result.get("comparison")
  lines = []
  if comparison:
    lines.append("| statistic | measured median | reference median | reference range | inside |")
    lines.append("|---|---|---|---|---|")
    for name, c in comparison.items():
      lines.append(f"| {name} | {c['candidate']:.3g} | {c['reference']:.3g} | "
                   f"{c['min']:.3g} .. {c['max']:.3g} | {'yes' if c['inside'] else 'NO'} |")
  else:
    lines.append("| statistic | median | IQR | range |")
    lines.append("|---|---|---|---|")
    for name, s in result["summary"].items():
      lines.append(f"| {name} | {s['median']:.3g} | {s['q25']:.3g} .. {s['q75']:.3g}"
                   f" | {s['min']:.3g} .. {s['max']:.3g} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_BRATS_DIR.value is None) == (_PHANTOM_CASES.value is None):
    raise errors.UserError("give exactly one of --brats_dir and --phantom_cases")
  if _PHANTOM_CASES.value is not None:
    if _PHANTOM_CASES.value < 1:
      raise errors.UserError(f"--phantom_cases={_PHANTOM_CASES.value}: must be >= 1")
    out_dir = _PHANTOM_DIR.value or tempfile.mkdtemp(prefix="phantom_stats_")
    common.require_local(phantom_dir=out_dir)
    brats_dir = phantom.run({"num_cases": _PHANTOM_CASES.value}, out_dir,
                            num_workers=_NUM_WORKERS.value, overwrite=True)
  else:
    brats_dir = _BRATS_DIR.value
  result = _measure(brats_dir)
  if _REFERENCE.value:
    reference = _reference(_REFERENCE.value)
    result["reference"] = {"source": reference.get("source"),
                           "summary": reference["summary"]}
    result["comparison"] = volume_stats.compare(result["summary"],
                                                reference["summary"])
  if _OUT.value:
    stage_io.write_json(_OUT.value, result)
  print(_table(result))


if __name__ == "__main__":
  app.run(main)
