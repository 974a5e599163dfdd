r"""Data-pipeline throughput: preprocessing cases/s per worker, reader slices/s.

  python -m launch.benchmark_data [--num_cases=6] [--scale=1.0] \
      [--brats_dir=DIR] [--num_workers=1] [--batch_size=32] [--seconds=3]

Prints one JSON line. Phantom cases are generated (full BraTS size by
default) unless --brats_dir points at real data.
"""

import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags

from launch import common

common.quiet_tensorflow()
common.define_config_flag("default.py")
_BRATS_DIR = flags.DEFINE_string("brats_dir", None, "Real data (else phantom).")
_NUM_CASES = flags.DEFINE_integer("num_cases", 6, "Phantom cases.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Phantom grid scale.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Preprocessing workers.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Reader batch size.")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Time per reader measurement.")
_READERS = flags.DEFINE_list("readers", ["grain", "tf", "synthetic"],
                             "Readers to measure.")


def _reader_rate(data_dir, split, reader, batch_size, seconds, image_size):
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  it = input_pipeline.get_batches(
      data_dir, split, batch_size=batch_size, reader=reader, seed=0,
      synthetic={"num_examples": 512, "image_size": image_size})
  next(it)  # warm-up: opening files, graph building, the first prefetch.
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    n += len(next(it)["image"])
  return n / (time.perf_counter() - start)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from data_pipeline import phantom  # pylint: disable=g-import-not-at-top
  from data_pipeline import preprocess  # pylint: disable=g-import-not-at-top
  cfg = flags.FLAGS.config.data.to_dict()
  cfg["centers"] = "auto"
  with tempfile.TemporaryDirectory() as tmp:
    brats_dir = _BRATS_DIR.value
    generate_s = None
    if brats_dir is None:
      start = time.perf_counter()
      brats_dir = phantom.generate(os.path.join(tmp, "raw"),
                                   num_cases=_NUM_CASES.value,
                                   scale=_SCALE.value).data_dir
      generate_s = time.perf_counter() - start
    out = os.path.join(tmp, "slices")
    marks = []
    start = time.perf_counter()
    manifest = preprocess.run(brats_dir, out, cfg, num_workers=_NUM_WORKERS.value,
                              progress=False,
                              on_case_done=lambda *_: marks.append(time.perf_counter()))
    total_s = time.perf_counter() - start
    cases_s = marks[-1] - start
    num_cases = len(marks)
    largest = max(manifest["splits"], key=lambda k: manifest["splits"][k]["num_slices"])
    readers = {
        r: round(_reader_rate(out, largest, r, _BATCH_SIZE.value,
                              _SECONDS.value, cfg["image_size"]), 1)
        for r in _READERS.value
    }
  print(json.dumps({
      "benchmark": "data",
      "machine": f"{platform.machine()} {os.cpu_count()} cpus",
      "cases": num_cases,
      "phantom_scale": None if _BRATS_DIR.value else _SCALE.value,
      "phantom_generate_s_per_case": (round(generate_s / num_cases, 3)
                                      if generate_s else None),
      "num_workers": _NUM_WORKERS.value,
      "preprocess_case_stage_s": round(cases_s, 2),
      "preprocess_cases_per_s": round(num_cases / cases_s, 3),
      "preprocess_cases_per_s_per_worker": round(num_cases / cases_s /
                                                 _NUM_WORKERS.value, 3),
      "build_and_write_s": round(total_s - cases_s, 2),
      "preprocess_total_s": round(total_s, 2),
      "slices": sum(s["num_slices"] for s in manifest["splits"].values()),
      "image_size": cfg["image_size"],
      "reader_split": largest,
      "reader_batch_size": _BATCH_SIZE.value,
      "reader_slices_per_s": readers,
  }))


if __name__ == "__main__":
  app.run(main)
