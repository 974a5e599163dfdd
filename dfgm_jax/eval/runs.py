"""Does the synthetic data help? The segmentation runs A-E (ALGORITHM.md 7, issue 12).

Each run trains the downstream segmenter (train/segmentation.py, the seeds of
config.seg.seeds stacked) on a mix of slice sets and measures it on a real
test split (never a synthetic one) with SegmentationEvaluator:

  A: center 1 real                      -> center 1 test
  B: A + center 1 synthetic (dfgm)      -> center 1 test
  C: center 2 real                      -> center 2 test
  D: C + center 1 synthetic (dfgm)      -> center 2 test
  E: center 1 synthetic only            -> center 1 test

Centers 1 and 2 are the first two of config.data.centers (CBICA, TCIA by
default, in that order). A run whose input is missing (no synthetic set, one
center only) is skipped and listed. The baseline sets (B', D' with the
`cutpaste` and `anomalydiffusion` sets) are B and D with another synthetic
set: `plan` adds them when `synthetic` holds such a set (see BASELINES).

Layout under W/eval/:
  runs/<id>/seg/       the segmenter's workdir (seed groups, checkpoints)
  runs/<id>/predictions.npz  the representative seed's (representative_seed)
                       predicted masks and probabilities of every test slice
                       (uint8, compressed), so that a reused run still draws
                       its figures without retraining.
  runs/<id>/false_positives.npz  every seed's predicted masks of the
                       tumor-free test slices (<center>_test_healthy; bits,
                       compressed): what the record's false positives count.
  runs/<id>/record.json  written last: the run's identity (defining seg
                       config, the training and test sets' fingerprints)
                       and its per-seed metrics and per-slice Dice/HD95,
                       and `false_positives` on the tumor-free slices of the
                       test patients (not part of the identity: a run
                       recorded without them, or for another such set, is
                       reused and measured again from its checkpoints);
                       a rerun with the same identity reuses it, another
                       identity is refused (errors.RunMismatch) unless
                       overwrite.
  figures/             overlay_<after>_vs_<before>.png per gain (test
                       slices, reference, both runs' predictions: PRIVATE
                       images), dice_per_run.png, training_curves.png.
  results.json         per run, per seed, per metric; mean and std over
                       seeds; its training slices and optimizer steps, test
                       patients and slices, and whether its loss was flat
                       at the end (`convergence`); relative gains with a
                       paired bootstrap interval over test patients and
                       seeds (null below evaluation.min_test_patients) and
                       their verdict; the slices' source (phantom, real or
                       unknown); "figures" (name -> path relative to
                       W/eval) and "figures_skipped" (figure, reason).
  results.md           the table next to the paper's figures, one sentence
                       per gain, the figures.

The library never imports the data layer: `real` and each synthetic set are
SliceData-like objects (manifest, split_size, load_split) made by
launch/evaluate.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping, Sequence
import zipfile

from absl import logging
import numpy as np

from dfgm_jax import errors
from dfgm_jax import parallel
from dfgm_jax import provenance
from dfgm_jax import stage_io
from dfgm_jax.eval import figures as figures_lib
from dfgm_jax.eval import segmentation_metrics as metrics_lib
from dfgm_jax.train import segmentation

EVAL = "eval"
REAL = "real"
DFGM = "dfgm"
# Synthetic sets of the baselines (ALGORITHM.md 8): run ids B_<name>, D_<name>.
BASELINES = ("cutpaste", "anomalydiffusion")
# Center 2's local synthesis with the shared model G2 (launch.synthesize_local:
# the published tumors of center 1 in center 2's own healthy slices; its split
# is named after the tumors' center): run D_local, the fairness use of Fig. 1c.
LOCAL = "local_g2"
# The paper's private centers, in the paper's order (center 1, center 2).
PAPER_CENTERS = ("CBICA", "TCIA")
# The paper's mean Dice (its Table; CBICA for A/B, TCIA for C/D).
PAPER_DICE = {"A": 0.51, "B": 0.53, "C": 0.65, "D": 0.68}
# Seg config fields that do not change the trained models' results.
_FREE_FIELDS = ("log_every", "checkpoint_every_epochs", "checkpoints_to_keep",
                "async_checkpoints", "tensorboard", "stack_seeds")
# The convergence check of a run's loss curve (convergence): flat at the end
# when the mean logged loss fell (or rose) between the window before and the
# last CONVERGENCE_WINDOW of its steps by less than CONVERGENCE_TOLERANCE of
# its whole fall since the first logged loss. A relative change of the loss
# itself would never call a curve flat on a small set: the training loss
# keeps falling towards 0 as the network memorises the slices (measured on
# the demo's run A, 54 slices, 2-core CPU: -20 to -25 % over the last 20 %
# at 300 steps, -47 % at 1200, while the test Dice did not improve: 0.68 /
# 0.73 at 300 steps, 0.67 / 0.68 at 1200). Both figures are reported.
CONVERGENCE_WINDOW = 0.2
CONVERGENCE_TOLERANCE = 0.05
# Metrics of SegmentationEvaluator.result() that get a mean and std over seeds.
METRICS = ("dice", "dice_pooled", "dice_patient", "hd95", "hd95_median")
# W/eval/FIGURES: the stage's figures; W/eval/runs/<id>/PREDICTIONS: a run's
# stored test predictions.
FIGURES = "figures"
PREDICTIONS = "predictions.npz"
# W/eval/runs/<id>/FP_PREDICTIONS: every seed's masks of the tumor-free test slices.
FP_PREDICTIONS = "false_positives.npz"
# False-positive measures per seed (segmentation_metrics.false_positives)
# that get a mean and std over seeds.
FP_METRICS = ("fp_pixels", "fp_fraction", "fp_mm2", "slices_with_fp")


@dataclasses.dataclass(frozen=True)
class Run:
  """One segmentation run of the plan.

  Attributes:
    id: A..E, or B_<baseline> / D_<baseline>.
    train: (set name, center index) pairs; set REAL reads <center>_train,
      a synthetic set <center>_synthetic.
    test: center index of the real <center>_test split.
    description: a line for the report.
  """

  id: str
  train: tuple[tuple[str, int], ...]
  test: int
  description: str


# (after, before): the relative gains reported, as the paper does.
GAINS = (("B", "A"), ("D", "C"))


def plan(synthetic_names: Sequence[str] = ()) -> tuple[list[Run], list[tuple[str, str]]]:
  """The runs and the gains (after, before) to report.

  Args:
    synthetic_names: names of the synthetic sets given; each BASELINES name
      adds its B and D runs (and their gains against A and C), LOCAL adds
      D_local (against C).
  """
  runs = [
      Run("A", ((REAL, 0),), 0, "center 1 real"),
      Run("B", ((REAL, 0), (DFGM, 0)), 0, "center 1 real + center 1 synthetic (dfgm)"),
      Run("C", ((REAL, 1),), 1, "center 2 real"),
      Run("D", ((REAL, 1), (DFGM, 0)), 1, "center 2 real + center 1 synthetic (dfgm)"),
      Run("E", ((DFGM, 0),), 0, "center 1 synthetic (dfgm) only"),
  ]
  gains = list(GAINS)
  for name in BASELINES:
    if name in synthetic_names:
      runs.append(Run(f"B_{name}", ((REAL, 0), (name, 0)), 0,
                      f"center 1 real + center 1 synthetic ({name})"))
      runs.append(Run(f"D_{name}", ((REAL, 1), (name, 0)), 1,
                      f"center 2 real + center 1 synthetic ({name})"))
      gains += [(f"B_{name}", "A"), (f"D_{name}", "C")]
  if LOCAL in synthetic_names:
    runs.append(Run("D_local", ((REAL, 1), (LOCAL, 0)), 1,
                    "center 2 real + center 2 local synthesis (G2, center 1's tumors)"))
    gains.append(("D_local", "C"))
  return runs, gains


def centers(config, real) -> list[str]:
  """Centers 1 and 2: config.data.centers, else the manifest's private ones.

  With 'auto' or 'all', the manifest's private centers, the paper's
  (CBICA, TCIA) first, then the others sorted.
  """
  spec = str(config.data.centers)
  if spec not in ("auto", "all"):
    names = [c.strip() for c in spec.split(",") if c.strip()]
  else:
    private = [c for c, v in real.manifest.get("centers", {}).items()
               if v.get("private")]
    names = ([c for c in PAPER_CENTERS if c in private]
             + sorted(c for c in private if c not in PAPER_CENTERS))
  return names[:2]


def layout(workdir: str) -> dict:
  """The stage's files under `workdir` (see the module docstring)."""
  root = os.path.join(workdir, EVAL)
  return {"eval": root, "runs": os.path.join(root, "runs"),
          "figures": os.path.join(root, FIGURES),
          "results_json": os.path.join(root, "results.json"),
          "results_md": os.path.join(root, "results.md")}


# --- Data ----------------------------------------------------------------------


def _split_name(set_name: str, center: str) -> str:
  return f"{center}_train" if set_name == REAL else f"{center}_synthetic"


class _Sets:
  """Loads each (set, split) once; says why an input is missing."""

  def __init__(self, real, synthetic: Mapping[str, Any]):
    self._sets = {REAL: real, **{k: v for k, v in synthetic.items()}}
    self._cache = {}

  def missing(self, set_name: str, split: str) -> str | None:
    data = self._sets.get(set_name)
    if data is None:
      return f"no {set_name} synthetic set"
    try:
      n = data.split_size(split)
    except errors.UserError as e:  # the data layer's NoSliceSet / UnknownSplit.
      return f"{set_name}: {e}"
    # Few patients per center can leave a split empty (test_fraction).
    return f"{set_name}: split {split} is empty" if n == 0 else None

  def load(self, set_name: str, split: str) -> dict:
    key = (set_name, split)
    if key not in self._cache:
      self._cache[key] = self._sets[set_name].load_split(split)
    return self._cache[key]


def _describe(set_name: str, split: str, d: dict) -> dict:
  """A set's entry in a run's identity: names, size, content fingerprint."""
  out = {"set": set_name, "split": split, "num_slices": int(len(d["image"])),
         "sha256": segmentation.fingerprint(d["image"], d["mask"])}
  if "mode" in d:  # a synthetic set: the modes that made it.
    out["modes"] = sorted({str(m) for m in d["mode"]})
  return out


def seg_identity(config) -> dict:
  """The fields of config.seg and config.data that define a run's models.

  The budget rule and its length define it (steps with budget=steps,
  epochs with budget=epochs; the other one trains nothing).
  """
  seg = json.loads(config.seg.to_json_best_effort())
  seg = {k: v for k, v in seg.items() if k not in _FREE_FIELDS}
  seg.pop("epochs" if seg.get("budget") == "steps" else "steps", None)
  return stage_io.normalise({
      "seg": seg,
      "data": {"modalities": list(config.data.modalities),
               "image_size": int(config.data.image_size)}})


# --- One run -------------------------------------------------------------------


def train_and_evaluate(config, seg_dir: str, train_sets: Sequence[dict],
                       test_set: dict, *, overwrite: bool = False,
                       progress: bool = True, healthy_set: dict | None = None,
                       spacing_mm=None) -> dict:
  """Trains the segmenter's seeds on the union of `train_sets`, tests each.

  Args:
    config: with `seg` and `data`.
    seg_dir: the segmenter's workdir (a rerun resumes it).
    train_sets: loaded splits (image, mask), concatenated in order.
    test_set: a loaded real split (image, mask, case_id).
    overwrite: replace another run's seed groups in `seg_dir`.
    progress: progress bars.
    healthy_set: tumor-free real slices of the test patients (image,
      case_id), or None: every seed's false positives on them.
    spacing_mm: their pixel size, when known (false positives in mm^2).

  Returns:
    dict: seeds (seed -> SegmentationEvaluator.result()), per_slice (seed ->
    {dice, hd95} lists in test-slice order), patients (test slice ->
    case_id), prediction (the representative seed's, as _prediction stores
    it), preempted; with healthy_set, false_positives and fp_masks
    (measure_false_positives).
  """
  image = np.concatenate([np.asarray(d["image"], np.float32) for d in train_sets])
  mask = np.concatenate([np.asarray(d["mask"], np.float32) for d in train_sets])
  result = segmentation.train(config, seg_dir, (image, mask), overwrite=overwrite,
                              progress=progress)
  out = {"seeds": {}, "per_slice": {}, "patients": [str(c) for c in test_set["case_id"]],
         "preempted": bool(result["preempted"])}
  if out["preempted"]:
    return out
  all_probs = {}
  for model in result["models"]:
    probs = segmentation.predict(model, test_set["image"])
    ev = metrics_lib.SegmentationEvaluator(kind="probs")
    ev.update(probs, test_set["mask"], out["patients"])
    s = ev.per_slice()
    out["seeds"][str(model.seed)] = ev.result()
    out["per_slice"][str(model.seed)] = {"dice": s["dice"].tolist(),
                                         "hd95": s["hd95"].tolist()}
    all_probs[str(model.seed)] = probs
  seed = representative_seed(out["seeds"])
  out["prediction"] = _prediction(int(seed), all_probs[seed])
  if healthy_set is not None:
    out["false_positives"], out["fp_masks"] = measure_false_positives(
        result["models"], healthy_set, spacing_mm)
  return out


def representative_seed(seeds: Mapping[str, dict]) -> str:
  """The seed whose mean Dice is the median over seeds (an even number: the
  lower of the two middle ones; ties keep config order): the one the
  overlays show, neither the best nor the first."""
  order = sorted(seeds, key=lambda s: seeds[s]["dice"])
  return order[(len(order) - 1) // 2]


# --- Stored predictions (for the figures) ----------------------------------------


def _prediction(seed: int, probs: np.ndarray) -> dict:
  """What a run stores of one seed's test predictions.

  mask: (N,S,S) uint8, thresholded as SegmentationEvaluator('probs') does,
  so its per-slice Dice is the recorded one; prob: (N,S,S) uint8, the
  probability in 1/255 steps (for threshold or calibration studies without
  the checkpoint; mostly 0 in the background, so it compresses well).
  """
  p = np.asarray(probs, np.float32)
  p = p[..., 0] if p.ndim == 4 else p
  return {"seed": str(int(seed)), "mask": (p > 0.5).astype(np.uint8),
          "prob": np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)}


def write_predictions(path: str, prediction: dict, test_sha256: str) -> None:
  """A run's stored predictions (_prediction) as a compressed npz, written
  atomically, with the fingerprint of the test set they are of."""
  buf = io.BytesIO()
  np.savez_compressed(buf, mask=prediction["mask"], prob=prediction["prob"],
                      seed=np.asarray(prediction["seed"]),
                      test_sha256=np.asarray(test_sha256))
  stage_io.write_bytes(path, buf.getvalue())


def read_predictions(path: str, test: dict, seed: str | None = None) -> dict | None:
  """{seed, mask, prob} stored at `path` for the test set `test` (a run
  identity's test entry), or None when there is none, it was made for
  another test set, or (seed given) of another seed."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      if str(f["test_sha256"]) != test["sha256"] or len(f["mask"]) != test["num_slices"]:
        return None
      if seed is not None and str(f["seed"]) != str(seed):
        return None
      return {"seed": str(f["seed"]), "mask": np.asarray(f["mask"]),
              "prob": np.asarray(f["prob"])}
  except (OSError, KeyError, ValueError, zipfile.BadZipFile):
    return None  # unreadable or of another format: made again from checkpoints.


def _predict_stored(config, seg_dir: str, test_set: dict, seed: str | None = None) -> dict:
  """A seed's prediction (default the first) from the run's checkpoints (a
  run recorded before predictions were stored, or with another seed's)."""
  models = segmentation.load(config, seg_dir)
  model = next((m for m in models if str(m.seed) == str(seed)), models[0])
  probs = segmentation.predict(model, test_set["image"])
  return _prediction(model.seed, probs)


def train_one(config, workdir: str, train: Sequence[tuple[Any, str]],
              test: tuple[Any, str], *, overwrite: bool = False,
              progress: bool = True) -> dict:
  """One run of any mix of sets (launch/train_segmentation.py).

  Trains (or resumes) in workdir/seg, tests every seed on `test` and writes
  workdir/results.json (per seed; mean and std over seeds).

  Args:
    config: with `seg` and `data`.
    workdir: the run's folder.
    train: (SliceData-like, split) pairs, concatenated.
    test: (SliceData-like, split) of the test slices (with case_id).
    overwrite: replace another run's seed groups in workdir/seg.
    progress: progress bars.

  Returns:
    results.json's content plus "path" and "stopped" (preempted: rerun to
    resume); on other processes than 0 only those two keys.
  """
  train_sets = [data.load_split(split) for data, split in train]
  test_set = test[0].load_split(test[1])
  out = train_and_evaluate(config, os.path.join(workdir, "seg"), train_sets, test_set,
                           overwrite=overwrite, progress=progress)
  path = os.path.join(workdir, "results.json")
  if out["preempted"] or not parallel.is_main():
    return {"path": path, "stopped": out["preempted"]}
  mean, std = _summary(out["seeds"])
  results = {"train": [_describe(getattr(d, "data_dir", "?"), sp, t)
                       for (d, sp), t in zip(train, train_sets)],
             "test": _describe(getattr(test[0], "data_dir", "?"), test[1], test_set),
             "seeds": out["seeds"], "mean": mean, "std": std}
  stage_io.write_json(path, results)
  return {**results, "path": path, "stopped": False}


# --- The stage -----------------------------------------------------------------


def _summary(seeds: dict) -> tuple[dict, dict]:
  """Mean and std over seeds of each metric."""
  mean, std = {}, {}
  for m in METRICS:
    values = np.asarray([r[m] for r in seeds.values()], np.float64)
    mean[m], std[m] = float(values.mean()), float(values.std())
  return mean, std


def _gain(after: dict, before: dict, seeds: Sequence[str], min_patients: int) -> dict:
  """Relative gain of mean Dice, its interval over patients and seeds, per seed.

  Below `min_patients` test patients the interval is None (a bootstrap
  over 1 or 2 patients gives a narrow interval that means nothing).
  """
  a = np.asarray([after["per_slice"][s]["dice"] for s in seeds])
  b = np.asarray([before["per_slice"][s]["dice"] for s in seeds])
  out = _withhold_small(metrics_lib.relative_gain_ci(b, a, before["patients"]),
                        min_patients)
  out["per_seed"] = {s: (float(a[i].mean() - b[i].mean()) / float(b[i].mean())
                         if b[i].mean() > 0 else None) for i, s in enumerate(seeds)}
  out["verdict"] = gain_verdict(out)
  return out


def _withhold_small(out: dict, min_patients: int) -> dict:
  """A bootstrap result (relative_gain_ci, difference_ci) with no interval
  (low, high None) below `min_patients` test patients: a bootstrap over 1
  or 2 patients gives a narrow interval that means nothing."""
  out["min_test_patients"] = int(min_patients)
  if out["n_patients"] < min_patients:
    out["low"] = out["high"] = None
  return out


def _too_few(g: dict) -> str | None:
  """The verdict of a result _withhold_small left without an interval."""
  if g["n_patients"] < g["min_test_patients"]:
    return (f"too few test patients to tell (n = {g['n_patients']} < "
            f"{g['min_test_patients']})")
  return None


def gain_verdict(g: dict) -> str:
  """The plain reading of a gain's interval (results.json, results.md).

  consistent with a gain (interval above 0), no evidence of a difference
  (it includes 0), consistent with a loss (below 0), too few test patients
  to tell (no interval), or undefined (a mean Dice of 0 before).
  """
  if _too_few(g):
    return _too_few(g)
  values = (g["gain"], g["low"], g["high"])
  if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
    return "undefined (a mean Dice of 0 before)"
  if g["low"] > 0:
    return "consistent with a gain"
  if g["high"] < 0:
    return "consistent with a loss (the synthetic data hurt here)"
  return "no evidence of a difference"


def gain_summary(g: dict) -> str:
  """One line of a gain: '+3.9 % [-1.2 %, +8.0 %]: <verdict>' (no interval
  below min_test_patients)."""
  interval = f" [{_pct(g['low'])}, {_pct(g['high'])}]" if g["low"] is not None else ""
  return f"{_pct(g['gain'])}{interval}: {g['verdict']}"


def convergence(steps: Sequence[int], losses: Sequence[float],
                window: float = CONVERGENCE_WINDOW,
                tolerance: float = CONVERGENCE_TOLERANCE) -> dict:
  """Whether one loss curve is flat at its end (see CONVERGENCE_WINDOW).

  Returns:
    converged (True, False, or None when a window holds fewer than 2 logged
    losses or the loss never fell), change (relative change of the mean
    loss from the window before to the last one), share (that change as a
    fraction of the fall from the first logged loss to the last window's
    mean: positive when falling), last_mean, previous_mean, first, steps
    (the last logged step).
  """
  order = np.argsort(np.asarray(steps, np.float64), kind="stable")
  steps = np.asarray(steps, np.float64)[order]
  losses = np.asarray(losses, np.float64)[order]
  end = float(steps.max()) if steps.size else 0.0
  last = losses[steps > end * (1 - window)]
  prev = losses[(steps > end * (1 - 2 * window)) & (steps <= end * (1 - window))]
  out = {"converged": None, "change": None, "share": None, "steps": int(end)}
  if len(last) < 2 or len(prev) < 2 or prev.mean() <= 0:
    return out
  fall = float(losses[0] - last.mean())
  out.update(change=float((last.mean() - prev.mean()) / prev.mean()),
             last_mean=float(last.mean()), previous_mean=float(prev.mean()),
             first=float(losses[0]))
  if fall <= 0:
    return out  # the loss never fell: no course to be flat against.
  share = float((prev.mean() - last.mean()) / fall)
  return {**out, "converged": abs(share) < tolerance, "share": share}


def run_convergence(seg_dir: str, seeds: Sequence[int]) -> dict:
  """A run's convergence: per seed (convergence of its loss curve) and
  overall (every seed flat; None when a seed's curve is too short)."""
  per_seed = {s: convergence(*curve) for s, curve in loss_curves(seg_dir, seeds).items()}
  flags = [c["converged"] for c in per_seed.values()]
  return {"converged": (None if not flags or None in flags else all(flags)),
          "window": CONVERGENCE_WINDOW, "tolerance": CONVERGENCE_TOLERANCE,
          "seeds": per_seed}


def data_source(manifest: Mapping) -> str:
  """phantom, real or unknown: the slices' source as preprocessing recorded
  it (unknown: slices made before the source was recorded)."""
  kind = (manifest.get("source") or {}).get("kind")
  return kind if kind in ("phantom", "real") else "unknown"


def run(config, workdir: str, real, synthetic: Mapping[str, Any] | None = None, *,
        overwrite: bool = False, progress: bool = True) -> dict:
  """Trains and tests the runs A-E (and B/D of each baseline set given).

  Args:
    config: the run's config (`seg`, `data`).
    workdir: W; writes W/eval (see the module docstring).
    real: the real slice set (SliceData-like: manifest, split_size,
      load_split), with <center>_train and <center>_test splits.
    synthetic: set name (DFGM, a BASELINES name, LOCAL) -> SliceData-like with
      <center>_synthetic splits, or None when that set does not exist.
    overwrite: redo runs recorded with another identity (else refused).
    progress: progress bars.

  Returns:
    On process 0: results.json's content plus "paths", "trained", "reused"
    (run ids) and "stopped" (a preemption stopped training; rerun to
    resume). Other processes: the same keys, results empty.

  Raises:
    errors.RunMismatch: a finished run of another identity (seg config or
      data), before anything is trained.
  """
  synthetic = dict(synthetic or {})
  paths = layout(workdir)
  names = centers(config, real)
  runs, gains = plan([k for k, v in synthetic.items() if v is not None])
  sets = _Sets(real, synthetic)
  base = seg_identity(config)

  # Inputs and identities of every run first: a refusal comes before any work.
  todo, skipped, fp = [], [], {}
  for r in runs:
    needed = {r.test} | {c for _, c in r.train}
    if max(needed) >= len(names):
      skipped.append({"id": r.id, "reason": f"needs {max(needed) + 1} centers, "
                      f"config.data.centers gives {names}"})
      continue
    test_split = f"{names[r.test]}_test"
    inputs = [(n, _split_name(n, names[c])) for n, c in r.train] + [(REAL, test_split)]
    why = next((w for w in (sets.missing(n, s) for n, s in inputs) if w), None)
    if why:
      skipped.append({"id": r.id, "reason": why})
      continue
    train = [_describe(n, s, sets.load(n, s)) for n, s in inputs[:-1]]
    n_train = sum(t["num_slices"] for t in train)
    if n_train < int(config.seg.batch_size):
      # Too few patients in a center (phantom or small cohorts): this run
      # cannot fill one batch; the others still run.
      skipped.append({"id": r.id, "reason": f"{n_train} training slices, fewer than "
                      f"config.seg.batch_size={config.seg.batch_size}"})
      continue
    identity = {**base, "train": train,
                "test": _describe(REAL, test_split, sets.load(REAL, test_split))}
    todo.append((r, inputs, identity))
    fp[r.id] = _plan_false_positives(sets, names[r.test])

  records = {}
  # 0: train, 1: reuse, 2: refused, 3: reuse, its stored predictions missing.
  code = np.zeros(len(todo), np.int32)
  fp_code = np.zeros(len(todo), np.int32)  # 1: measure a reused run's false positives.
  refusal = None
  if parallel.is_main():
    for i, (r, _, identity) in enumerate(todo):
      try:
        rec = stage_io.check_done(os.path.join(paths["runs"], r.id, "record.json"),
                                  identity, what=f"evaluation run {r.id}",
                                  overwrite=overwrite)
      except errors.RunMismatch as e:
        code[i], refusal = 2, refusal or e
      else:
        if rec is not None:
          stored = read_predictions(
              os.path.join(paths["runs"], r.id, PREDICTIONS), identity["test"],
              seed=representative_seed(rec["seeds"]))
          code[i], records[r.id] = (1 if stored is not None else 3), rec
          fp_code[i] = _false_positives_stale(rec, fp[r.id])
  code = parallel.broadcast(code)
  fp_code = parallel.broadcast(fp_code)
  if (code == 2).any():
    raise refusal or errors.RunMismatch(
        f"{paths['eval']} holds evaluation runs of another config (see process 0)")

  trained, reused = [], []
  for i, (r, inputs, identity) in enumerate(todo):
    if code[i] == 3:
      _restore_predictions(config, os.path.join(paths["runs"], r.id), sets.load(*inputs[-1]),
                           identity["test"], representative_seed(records[r.id]["seeds"])
                           if r.id in records else None)
    if fp_code[i]:
      _restore_false_positives(config, os.path.join(paths["runs"], r.id), sets, fp[r.id],
                               records)
    if code[i] in (1, 3):
      reused.append(r.id)
      continue
    out = train_and_evaluate(
        config, os.path.join(paths["runs"], r.id, "seg"),
        [sets.load(n, s) for n, s in inputs[:-1]], sets.load(*inputs[-1]),
        overwrite=overwrite, progress=progress,
        healthy_set=sets.load(REAL, fp[r.id]["split"]) if "set" in fp[r.id] else None,
        spacing_mm=fp[r.id].get("spacing_mm"))
    if out["preempted"]:
      return {"paths": paths, "trained": trained, "reused": reused, "stopped": True}
    trained.append(r.id)
    if parallel.is_main():
      write_predictions(os.path.join(paths["runs"], r.id, PREDICTIONS),
                        out["prediction"], identity["test"]["sha256"])
      extra = {}
      if "false_positives" in out:
        extra["false_positives"] = _store_false_positives(
            os.path.join(paths["runs"], r.id), fp[r.id], out["false_positives"],
            out["fp_masks"])
      records[r.id] = stage_io.mark_done(
          os.path.join(paths["runs"], r.id, "record.json"), identity,
          seeds=out["seeds"], per_slice=out["per_slice"], patients=out["patients"],
          **extra)

  done = {"paths": paths, "trained": trained, "reused": reused, "stopped": False}
  if not parallel.is_main():
    return done
  results = _results(config, names, gains, todo, records, skipped)
  add_false_positives(results, records, fp)
  results["data_source"] = data_source(real.manifest)
  for rid in results["runs"]:
    results["runs"][rid]["convergence"] = run_convergence(
        os.path.join(paths["runs"], rid, "seg"), [int(s) for s in config.seg.seeds])
  results["figures"], results["figures_skipped"] = draw_figures(
      config, paths, gains, todo, records, results, sets)
  stage_io.write_json(paths["results_json"], results)
  stage_io.write_text(paths["results_md"], report(results))
  return {**results, **done}


def _restore_predictions(config, run_dir: str, test_set: dict, test: dict,
                         seed: str | None = None) -> None:
  """Stores a reused run's predictions from its checkpoints (every process
  restores; process 0 writes). A run whose checkpoints are gone keeps no
  predictions: its overlays are skipped with the reason, the stage goes on."""
  try:
    prediction = _predict_stored(config, os.path.join(run_dir, "seg"), test_set, seed)
  except Exception as e:  # pylint: disable=broad-except
    # No checkpoint (errors.UserError) or an unreadable one: only a figure lost.
    logging.warning("no stored predictions for %s: %s", run_dir, e)
    return
  if parallel.is_main():
    write_predictions(os.path.join(run_dir, PREDICTIONS), prediction, test["sha256"])


# --- False positives on tumor-free test slices -----------------------------------
#
# Dice on tumor slices cannot see a segmenter that finds tumors everywhere
# (what pasted tumors may teach it). Every run's seeds also predict the
# tumor-free slices of its test patients (<center>_test_healthy, private,
# never trained on); any predicted pixel there is a false positive. Not part
# of a run's identity: the models do not depend on it, so a run recorded
# without it (or for another such set) is reused and measured again from its
# checkpoints, never retrained.


def test_healthy_split(center: str) -> str:
  """The tumor-free slices of `center`'s test patients (preprocessing)."""
  return f"{center}_{provenance.TEST_HEALTHY}"


def pixel_spacing_mm(manifest: dict):
  """The slices' pixel size in mm when the manifest states it, else None.

  Preprocessing resamples each volume's grid to image_size without
  recording the output pixel size, so today this is None and false
  positives are given in pixels and as a fraction of the slice.
  """
  value = manifest.get("pixel_spacing_mm")
  return None if value is None else value


def _plan_false_positives(sets: _Sets, center: str) -> dict:
  """{split, set (its _describe), spacing_mm}, or {split, reason} when the
  slice set cannot give the measure."""
  split = test_healthy_split(center)
  real = sets._sets[REAL]  # pylint: disable=protected-access
  if split not in real.manifest.get("splits", {}):
    return {"split": split, "reason": f"false positives not measured: no {split} split "
                                      "(rebuild the slices with --overwrite)"}
  if not real.split_size(split):
    return {"split": split, "reason": f"false positives not measured: {split} is empty "
                                      "(the test patients have no tumor-free slice)"}
  return {"split": split, "set": _describe(REAL, split, sets.load(REAL, split)),
          "spacing_mm": pixel_spacing_mm(real.manifest)}


def measure_false_positives(models, healthy_set: dict, spacing_mm=None
                            ) -> tuple[dict, np.ndarray]:
  """Every seed's false positives on tumor-free slices.

  Returns:
    ({seeds: seed -> segmentation_metrics.false_positives without
    per_slice, per_slice: seed -> predicted pixels per slice, patients:
    slice -> case id}, masks (n_seeds, N, S, S) bool), thresholded as the
    evaluator does (probability > 0.5).
  """
  patients = [str(c) for c in healthy_set["case_id"]]
  entry = {"seeds": {}, "per_slice": {}, "patients": patients}
  masks = []
  for model in models:
    probs = np.asarray(segmentation.predict(model, healthy_set["image"]))[..., 0]
    pred = probs > 0.5
    res = metrics_lib.false_positives(pred, patients, spacing_mm)
    entry["per_slice"][str(model.seed)] = res.pop("per_slice")
    entry["seeds"][str(model.seed)] = res
    masks.append(pred)
  return entry, np.stack(masks)


def _store_false_positives(run_dir: str, plan: dict, entry: dict,
                           masks: np.ndarray) -> dict:
  """Writes the masks (bits, compressed) beside the record; returns the
  record's `false_positives` entry (naming the set it was measured on)."""
  buf = io.BytesIO()
  np.savez_compressed(buf, mask=np.packbits(masks.astype(bool), axis=-1),
                      shape=np.asarray(masks.shape), seeds=np.asarray(list(entry["seeds"])),
                      test_healthy_sha256=np.asarray(plan["set"]["sha256"]))
  stage_io.write_bytes(os.path.join(run_dir, FP_PREDICTIONS), buf.getvalue())
  return {"test_healthy": plan["set"], "spacing_mm": plan.get("spacing_mm"), **entry}


def read_false_positive_masks(run_dir: str) -> dict | None:
  """{seeds, mask (n_seeds, N, S, S) bool, test_healthy_sha256} stored by a
  run, or None."""
  path = os.path.join(run_dir, FP_PREDICTIONS)
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    shape = tuple(int(x) for x in f["shape"])
    mask = np.unpackbits(f["mask"], axis=-1, count=shape[-1]).astype(bool)
    return {"seeds": [str(s) for s in f["seeds"]], "mask": mask.reshape(shape),
            "test_healthy_sha256": str(f["test_healthy_sha256"])}


def _false_positives_stale(record: dict, plan: dict) -> int:
  """1 when a reused run lacks the false positives of the set planned."""
  if "set" not in plan:
    return 0
  stored = record.get("false_positives") or {}
  same = (stored.get("test_healthy", {}).get("sha256") == plan["set"]["sha256"]
          and sorted(stored.get("seeds", {})) == sorted(record.get("seeds", {})))
  return 0 if same else 1


def _restore_false_positives(config, run_dir: str, sets: _Sets, plan: dict,
                             records: dict) -> None:
  """Measures a reused run's false positives from its checkpoints (every
  process predicts; process 0 writes them into the run's record). Without
  readable checkpoints the measure is skipped with the reason."""
  try:
    models = segmentation.load(config, os.path.join(run_dir, "seg"))
    entry, masks = measure_false_positives(models, sets.load(REAL, plan["split"]),
                                           plan.get("spacing_mm"))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("false positives of %s not measured: %s", run_dir, e)
    plan["reason"] = (f"false positives not measured: the run's checkpoints cannot be "
                      f"read ({e}); rerun it with --overwrite")
    return
  if parallel.is_main():
    rid = os.path.basename(os.path.normpath(run_dir))
    record = dict(records[rid])
    record["false_positives"] = stage_io.normalise(
        _store_false_positives(run_dir, plan, entry, masks))
    stage_io.write_json(os.path.join(run_dir, "record.json"), record)
    records[rid] = record


def summarise_false_positives(stored: dict) -> dict:
  """results.json's false positives of a run: per seed, mean and std."""
  seeds = stored["seeds"]
  first = next(iter(seeds.values()))
  mean, std = {}, {}
  for m in FP_METRICS:
    values = [v.get(m) for v in seeds.values()]
    if any(v is None for v in values):
      mean[m] = std[m] = None
      continue
    mean[m], std[m] = float(np.mean(values)), float(np.std(values))
  return {"split": stored["test_healthy"]["split"],
          "sha256": stored["test_healthy"]["sha256"],
          "n_slices": first["n_slices"], "n_patients": first["n_patients"],
          "spacing_mm": stored.get("spacing_mm"), "seeds": seeds, "mean": mean, "std": std}


def add_false_positives(results: dict, records: dict, fp: dict) -> None:
  """Each run of `results` gets `false_positives`: the summary of what its
  record holds for the planned set, or {split, skipped: reason}."""
  for rid, r in results["runs"].items():
    plan = fp.get(rid, {})
    stored = (records.get(rid) or {}).get("false_positives")
    if (stored and "set" in plan and "reason" not in plan
        and stored.get("test_healthy", {}).get("sha256") == plan["set"]["sha256"]):
      r["false_positives"] = summarise_false_positives(stored)
    else:
      r["false_positives"] = {"split": plan.get("split"),
                              "skipped": plan.get("reason", "false positives not measured")}
  seeds = [str(s) for s in results.get("seeds", [])]
  for g in results.get("gains", {}).values():
    a, b = g["after_run"], g["before_run"]
    fa, fb = (results["runs"][x]["false_positives"] for x in (a, b))
    if "mean" in fa and "mean" in fb and fa["sha256"] == fb["sha256"]:
      g["false_positives"] = false_positive_difference(
          records[a]["false_positives"], records[b]["false_positives"], seeds,
          int(g.get("min_test_patients", 5)))


def false_positive_difference(after: dict, before: dict, seeds: Sequence[str],
                              min_patients: int) -> dict:
  """After minus before of the false-positive pixels per tumor-free slice,
  with the gains' paired bootstrap over patients and seeds; no interval
  below `min_patients` test patients."""
  a = np.asarray([after["per_slice"][s] for s in seeds], np.float64)
  b = np.asarray([before["per_slice"][s] for s in seeds], np.float64)
  out = _withhold_small(metrics_lib.difference_ci(b, a, before["patients"]), min_patients)
  if _too_few(out):
    out["verdict"] = _too_few(out)
  elif out["low"] > 0:
    out["verdict"] = "more false positives"
  elif out["high"] < 0:
    out["verdict"] = "fewer false positives"
  else:
    out["verdict"] = "no evidence of a difference in false positives"
  return out


def _fp_area(f: dict, stat: str = "mean") -> str:
  m = f[stat]
  text = f"{m['fp_pixels']:.1f} px"
  if m.get("fp_mm2") is not None:
    text += f" ({m['fp_mm2']:.1f} mm²)"
  return text


def _fp_sentence(g: dict, runs_: dict) -> str:
  a, b = g["after_run"], g["before_run"]
  fa, fb = (runs_[x].get("false_positives") or {} for x in (a, b))
  why = [f"{x}: {f.get('skipped', 'not measured')}" for x, f in ((a, fa), (b, fb))
         if "mean" not in f]
  if why:
    return f"{a} vs {b}: false positives not compared ({'; '.join(why)})."
  text = (f"{a}'s false-positive area per tumor-free slice is {_fp_area(fa)} against "
          f"{b}'s {_fp_area(fb)} (any false positive on "
          f"{100 * fa['mean']['slices_with_fp']:.0f} % against "
          f"{100 * fb['mean']['slices_with_fp']:.0f} % of the {fa['n_slices']} tumor-free "
          f"slices of {fa['n_patients']} test patients)")
  d = g.get("false_positives")
  if not d:
    return text + "."
  if d["low"] is None:
    return text + f": {d['verdict']}."
  return (text + f"; difference {d['difference']:+.1f} px, 95 % bootstrap interval over "
          f"patients and seeds [{d['low']:+.1f}, {d['high']:+.1f}] px: {d['verdict']}.")


def _false_positive_lines(results: dict) -> list[str]:
  """results.md's false-positive table and one sentence per gain."""
  runs_ = results["runs"]
  if not any("false_positives" in r for r in runs_.values()):
    return []
  lines = ["", "False positives on the test patients' tumor-free slices "
           "(`<center>_test_healthy`: any predicted tumor pixel there is one), mean ± std "
           "over seeds:", "",
           "| run | tumor-free slices (patients) | FP area per slice | FP % of the slice "
           "| slices with any FP |", "|---|---|---|---|---|"]
  for rid, r in runs_.items():
    f = r.get("false_positives") or {}
    if "mean" not in f:
      lines.append(f"| {rid} | - | {f.get('skipped', 'not measured')} | - | - |")
      continue
    m, s = f["mean"], f["std"]
    lines.append(
        f"| {rid} | {f['n_slices']} ({f['n_patients']}) | {_fp_area(f)} ± "
        f"{s['fp_pixels']:.1f} | {100 * m['fp_fraction']:.2f} % | "
        f"{100 * m['slices_with_fp']:.0f} % ± {100 * s['slices_with_fp']:.0f} |")
  lines.append("")
  for g in results["gains"].values():
    lines.append(f"- {_fp_sentence(g, runs_)}")
  return lines


def _results(config, names, gains, todo, records, skipped) -> dict:
  seeds = [str(int(s)) for s in config.seg.seeds]
  out_runs = {}
  for r, inputs, identity in todo:
    rec = records[r.id]
    mean, std = _summary(rec["seeds"])
    n_train = sum(t["num_slices"] for t in identity["train"])
    out_runs[r.id] = {
        "description": r.description,
        "train": identity["train"], "test": identity["test"],
        "train_slices": n_train,
        "steps": segmentation.total_steps(config.seg, n_train),
        "test_patients": len(set(rec["patients"])),
        "test_slices": len(rec["patients"]),
        "seeds": rec["seeds"], "mean": mean, "std": std,
        "paper_dice": PAPER_DICE.get(r.id)}
  out_gains = {}
  for after, before in gains:
    if after in records and before in records:
      out_gains[f"{after}_vs_{before}"] = {
          "after_run": after, "before_run": before,
          "paper": ((PAPER_DICE[after] - PAPER_DICE[before]) / PAPER_DICE[before]
                    if after in PAPER_DICE and before in PAPER_DICE else None),
          **_gain(records[after], records[before], seeds,
                  _min_test_patients(config))}
  return {"centers": names, "seeds": [int(s) for s in seeds],
          "budget": _budget(config.seg),
          "metric": "mean per-slice Dice of the real test split (primary)",
          "runs": out_runs, "gains": out_gains, "skipped": skipped}


def _min_test_patients(config) -> int:
  """config.evaluation.min_test_patients (5, its default, without the section)."""
  return int((config.get("evaluation") or {}).get("min_test_patients", 5))


def _budget(seg) -> dict:
  """How long each run trained: the rule and its length."""
  if seg.budget == "steps":
    return {"rule": "steps", "steps": int(seg.steps)}
  return {"rule": "epochs", "epochs": int(seg.epochs)}


# --- Figures -------------------------------------------------------------------


class _NoFigure(Exception):
  """A figure this stage cannot draw; the message says why."""


def draw_figures(config, paths: dict, gains, todo, records: dict, results: dict,
                 sets: _Sets) -> tuple[dict, list]:
  """Draws the stage's figures in paths["figures"] (process 0).

  The overlays of each gain (after, before) from the runs' stored
  predictions, Dice per run from `results`, the training curves from the
  segmenter's metrics.jsonl. A figure that cannot be drawn is left out with
  its reason: figures are views of results already computed, never worth
  failing the stage for. PNGs of an earlier call that were not drawn again
  are removed, so the folder holds exactly the figures listed.

  Returns:
    figures (name -> path relative to W/eval), skipped ([{figure, reason}]).
  """
  os.makedirs(paths["figures"], exist_ok=True)
  by_id = {r.id: (r, inputs, identity) for r, inputs, identity in todo}
  jobs, skipped = [], []
  for after, before in gains:
    name = f"overlay_{after}_vs_{before}"
    missing = [x for x in (before, after) if x not in records]
    if missing:
      skipped.append({"figure": name, "reason": f"run {', '.join(missing)} did not run"})
      continue
    jobs.append((name, lambda path, a=after, b=before: _overlays(
        path, config, paths, by_id[a], by_id[b], records, sets)))
  jobs.append(("dice_per_run", lambda path: _dice(path, results)))
  jobs.append(("training_curves", lambda path: _curves(
      path, paths, config, [r.id for r, _, _ in todo], gains)))
  figures = {}
  for name, draw in jobs:
    try:
      draw(os.path.join(paths["figures"], f"{name}.png"))
    except _NoFigure as e:
      skipped.append({"figure": name, "reason": str(e)})
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("figure %s not drawn: %s", name, e)
      skipped.append({"figure": name, "reason": f"{type(e).__name__}: {e}"})
    else:
      figures[name] = f"{FIGURES}/{name}.png"
  for f in os.listdir(paths["figures"]):
    if f.endswith(".png") and f"{FIGURES}/{f}" not in figures.values():
      os.remove(os.path.join(paths["figures"], f))
  return figures, skipped


def _overlays(path: str, config, paths: dict, after, before, records: dict,
              sets: _Sets) -> None:
  """Figure 3/4: the test slices of pick_slices, before and after."""
  (ra, inputs, ida), (rb, _, idb) = after, before
  if ida["test"]["sha256"] != idb["test"]["sha256"]:
    raise _NoFigure(f"runs {rb.id} and {ra.id} were tested on different sets")
  pred, shown = {}, []
  for r, identity in ((rb, idb), (ra, ida)):
    pred[r.id] = read_predictions(os.path.join(paths["runs"], r.id, PREDICTIONS),
                                  identity["test"])
    if pred[r.id] is not None:
      shown.append(_seed_shown(r.id, pred[r.id]["seed"], records[r.id]["seeds"]))
    if pred[r.id] is None:
      raise _NoFigure(f"run {r.id} has no stored predictions of its test set "
                      "(its checkpoints are gone; rerun it with --overwrite)")
  test = sets.load(*inputs[-1])
  patients = [str(c) for c in test["case_id"]]
  idx = figures_lib.pick_slices(test["mask"], patients)
  # The per-slice Dice the run recorded for the seed whose masks are shown.
  dice = {rid: np.asarray(records[rid]["per_slice"][p["seed"]]["dice"])[idx]
          for rid, p in pred.items()}
  where = test.get("slice_index")
  labels = [patients[i] + (f", slice {int(where[i])}" if where is not None else "")
            for i in idx]
  figures_lib.overlay_figure(
      path, np.asarray(test["image"])[idx], np.asarray(test["mask"])[idx],
      pred[rb.id]["mask"][idx], pred[ra.id]["mask"][idx], dice[rb.id], dice[ra.id],
      labels, (rb.id, ra.id), modality=str(config.data.modalities[0]),
      title=(f"{ra.id} vs {rb.id} on {ida['test']['split']}: {rb.description} -> "
             f"{ra.description}\n{'; '.join(shown)}"),
      seeds=(pred[rb.id]["seed"], pred[ra.id]["seed"]))


def _seed_shown(rid: str, seed: str, seeds: dict) -> str:
  """Which seed an overlay shows for a run, and whether it is the
  representative one (median Dice over seeds)."""
  want = representative_seed(seeds)
  if str(seed) == want:
    return f"{rid}: seed {seed}, the median-Dice seed of {len(seeds)}"
  return (f"{rid}: seed {seed}, not the median-Dice seed {want} (its predictions "
          "could not be made: no checkpoint)")


def _dice(path: str, results: dict) -> None:
  if not results["runs"]:
    raise _NoFigure("no run finished")
  kind = results.get("data_source", "unknown")  # phantom | real | unknown.
  figures_lib.dice_figure(
      path, results["runs"],
      title=f"mean per-slice Dice of the real test split, seeds {results['seeds']}",
      source_kind=kind)


def loss_curves(seg_dir: str, seeds: Sequence[int]) -> dict:
  """seed -> (steps, losses) from a segmenter workdir's metrics.jsonl.

  Reads the stacked group first, then each seed's own, as segmentation.load
  does; the loss of seed s is the rows' loss_seed<s>.
  """
  groups = dict.fromkeys([segmentation.group_name(seeds)]
                         + [segmentation.group_name([s]) for s in seeds])
  out = {}
  for group in groups:
    f = os.path.join(seg_dir, group, "metrics.jsonl")
    if not os.path.exists(f):
      continue
    with open(f) as fh:
      rows = [json.loads(line) for line in fh if line.strip()]
    for s in seeds:
      key = f"loss_seed{int(s)}"
      points = sorted((r["step"], r[key]) for r in rows if key in r)
      if points and str(s) not in out:
        out[str(s)] = ([p[0] for p in points], [p[1] for p in points])
  return out


def _curves(path: str, paths: dict, config, ids: Sequence[str], gains=()) -> None:
  seeds = [int(s) for s in config.seg.seeds]
  curves = {rid: loss_curves(os.path.join(paths["runs"], rid, "seg"), seeds)
            for rid in ids}
  if not any(curves.values()):
    raise _NoFigure("no run has metrics.jsonl rows")
  figures_lib.curves_figure(path, curve_panels(curves, gains),
                            title=f"segmenter training loss ({config.seg.loss})")


def curve_panels(curves: Mapping[str, dict], gains) -> dict:
  """Panel title -> run id -> seed -> (steps, losses): one panel per gain
  (before, then after, on one axis), then one per run in no gain."""
  panels, placed = {}, set()
  for after, before in gains:
    if after in curves and before in curves:
      panels[f"{after} vs {before}"] = {before: curves[before], after: curves[after]}
      placed |= {after, before}
  for rid, c in curves.items():
    if rid not in placed:
      panels[f"run {rid}"] = {rid: c}
  return panels


# --- Report --------------------------------------------------------------------


def _pct(x) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f} %"


def _gain_sentence(key: str, g: dict, results: dict) -> str:
  r = results["runs"]
  a, b = g["after_run"], g["before_run"]
  per_seed = ", ".join(f"seed {s} {_pct(v)}" for s, v in g.get("per_seed", {}).items())
  text = (f"{a} vs {b} ({r[a]['description']} against {r[b]['description']}; "
          f"mean Dice {g['before']:.3f} -> {g['after']:.3f}): relative Dice gain "
          f"{_pct(g['gain'])} ({per_seed})")
  if g["low"] is not None:
    text += (f", 95 % bootstrap interval over {g['n_patients']} test patients and "
             f"{g.get('n_seeds', 1)} seeds [{_pct(g['low'])}, {_pct(g['high'])}]")
  if g.get("paper") is not None:
    text += f" (paper: {_pct(g['paper'])})"
  return text + f": {g['verdict']}."


def _budget_sentence(results: dict) -> str:
  budget = results.get("budget") or {}
  if budget.get("rule") == "steps":
    return (f"Every run trained {budget['steps']} optimizer steps (config.seg.budget="
            "steps): the before and the after run of each gain had the same number "
            "of updates.")
  if budget.get("rule") == "epochs":
    return (f"Every run trained {budget['epochs']} epochs of its own training set "
            "(config.seg.budget=epochs, the paper's rule): a run with the synthetic "
            "set added took more optimizer steps than its before run (column steps), "
            "and more steps alone can read as a gain.")
  return "The training budget was not recorded."


def _convergence_sentence(rid: str, run: dict) -> str | None:
  c = run.get("convergence")
  if not c or not c.get("seeds"):
    return None
  parts = []
  for s, v in c["seeds"].items():
    if v.get("share") is not None:
      parts.append(f"{_pct(v['change'])} (seed {s}; {100 * v['share']:.1f} % of its fall "
                   "since the first logged step)")
    elif v.get("change") is not None:
      parts.append(f"{_pct(v['change'])} (seed {s}; the loss never fell)")
    else:
      parts.append(f"not measurable (seed {s}: too few logged losses)")
  text = (f"{rid}'s loss changed by {', '.join(parts)} over its last "
          f"{round(100 * c['window'])} % of {run.get('steps', '?')} steps")
  tol = round(100 * c["tolerance"])
  if c["converged"] is None:
    return text + ": flatness unknown (log the loss more often)."
  if c["converged"]:
    return text + f": flat (under {tol} % of its fall)."
  if any((v.get("share") or 0) < 0 for v in c["seeds"].values()):
    return text + f": not flat (rising by more than {tol} % of its fall): unstable training."
  return text + (f": not flat (still falling by more than {tol} % of its fall): the budget "
                 "may be too small to compare.")


_SOURCE = {
    "phantom": "phantom data: its Dice is not the paper's Dice (BraTS).",
    "real": "real data.",
    "unknown": "unknown (slices made before the source was recorded).",
}


def report(results: dict) -> str:
  """results.md: the Dice table next to the paper's figures, one sentence per gain."""
  names = results["centers"]
  c1 = names[0] if names else "center 1"
  c2 = names[1] if len(names) > 1 else "center 2"
  lines = [
      "# Downstream segmentation: does the synthetic data help?", "",
      f"Slices: {_SOURCE[results.get('data_source', 'unknown')]}", "",
      f"Center 1 = {c1}, center 2 = {c2}; seeds {results['seeds']}. Test sets are "
      "always real. Dice: mean per-slice Dice (primary), mean ± std over seeds; "
      "HD95 in mm. " + _budget_sentence(results), "",
      "| run | train | train slices | steps | test | test patients / slices | Dice | "
      "Dice per seed | pooled Dice | HD95 | "
      + ("paper Dice (BraTS; not comparable with phantom Dice) |"
         if results.get("data_source") == "phantom" else "paper Dice |"),
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  paper_center = {"A": "CBICA", "B": "CBICA", "C": "TCIA", "D": "TCIA"}
  for rid, r in results["runs"].items():
    per_seed = ", ".join(f"{v['dice']:.3f}" for v in r["seeds"].values())
    paper = (f"{r['paper_dice']:.2f} ({paper_center[rid]})"
             if r.get("paper_dice") is not None else "-")
    lines.append(
        f"| {rid} | {r['description']} | {r.get('train_slices', '?')} | "
        f"{r.get('steps', '?')} | {r['test']['split']} | "
        f"{r.get('test_patients', '?')} / {r.get('test_slices', '?')} | "
        f"{r['mean']['dice']:.3f} ± {r['std']['dice']:.3f} | {per_seed} | "
        f"{r['mean']['dice_pooled']:.3f} | {r['mean']['hd95']:.1f} | {paper} |")
  lines += ["", "The paper reports 0.51 -> 0.53 on CBICA (A -> B, +3.9 %) and "
            "0.65 -> 0.68 on TCIA (C -> D, +4.6 %) on real BraTS 2020 slices"
            + (": phantom tumors are easier to segment, so this run's Dice and gains "
               "are not a reproduction of those figures."
               if results.get("data_source") == "phantom" else "."), ""]
  # The before runs (A, C, ...), also when their after run did not run.
  befores = [g["before_run"] for g in results["gains"].values()]
  befores += [b for _, b in GAINS if b in results["runs"]]
  for rid in dict.fromkeys(befores):
    sentence = _convergence_sentence(rid, results["runs"][rid])
    if sentence:
      lines.append(f"- {sentence}")
  for key, g in results["gains"].items():
    lines.append(f"- {_gain_sentence(key, g, results)}")
  modes = sorted({m for r in results["runs"].values() for s in r["train"]
                  if s["set"] == DFGM for m in s.get("modes", [DFGM]) if m != DFGM})
  if modes:  # e.g. a cut-paste set given as the dfgm set.
    lines.append(f"- Note: the synthetic set used as `{DFGM}` was made with mode(s) "
                 f"{modes}, not dfgm.")
  for s in results["skipped"]:
    lines.append(f"- Run {s['id']} skipped: {s['reason']}.")
  lines += _false_positive_lines(results)
  return "\n".join(lines + _figures_section(results)) + "\n"


_FIGURE_CAPTIONS = {
    "dice_per_run": "Dice per run: mean over seeds (bar), each seed (dot), std "
                    "(error bar), the paper's BraTS Dice (red diamond; not shown on "
                    "phantom data)",
    "training_curves": "Training loss of the segmenter against optimizer step, a "
                       "gain's before and after runs on one axis (thin: seeds, "
                       "thick: their mean)",
}


def _figures_section(results: dict) -> list[str]:
  """Links to the figures (relative to W/eval; they show private slices)."""
  figures, skipped = results.get("figures", {}), results.get("figures_skipped", [])
  if not figures and not skipped:
    return []
  lines = ["", "## Figures", "",
           "The overlays show private test slices: keep this folder private."]
  for name, rel in figures.items():
    caption = _FIGURE_CAPTIONS.get(name) or (
        "Test slices: image, reference, prediction before and after (each run's "
        "median-Dice seed), " +
        name.replace("overlay_", "").replace("_vs_", " vs "))
    lines += ["", f"![{caption}]({rel})"]
  if skipped:
    lines.append("")
  for s in skipped:
    lines.append(f"- Figure {s['figure']} not drawn: {s['reason']}.")
  return lines
