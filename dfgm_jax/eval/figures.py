"""Figures of the synthesis and evaluation stages (matplotlib, Agg backend).

  comparison_figure   the synthesis stage's grid in the style of the paper's
                      Figure 2 (tumor slice, healthy matches, synthetic ones).
  overlay_figure      the paper's Figure 3/4 style: test slices with the
                      reference and two runs' predictions (before, after),
                      with a legend of the colours.
  dice_figure         mean Dice per run with its seeds, and the paper's value
                      unless the data is phantom (not comparable).
  curves_figure       the segmenter's training loss against optimizer step,
                      one panel per gain (its before and after runs on one
                      axis, so that their budgets show) or per run.

Every figure is written atomically (a temporary file, then a rename), so a
stage stopped while drawing never leaves half a PNG. The evaluation's
figures show private test slices: they belong in the private eval folder.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

from dfgm_jax import stage_io

# Slices per overlay figure: a config-free constant, so every run's figure
# shows the same number of rows.
OVERLAY_SLICES = 4
_REF_COLOR = "red"
_PRED_COLOR = "yellow"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str, dpi: int = 110) -> str:
  """Saves `fig` as a PNG at `path` atomically and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  _pyplot().close(fig)
  stage_io.write_bytes(path, buf.getvalue())
  return path


def _gray(img: np.ndarray) -> np.ndarray:
  """The first channel of an image in [-1, 1], as [0, 1] gray."""
  return np.clip((np.asarray(img)[..., 0] + 1.0) / 2.0, 0.0, 1.0)


def _plane(mask: np.ndarray) -> np.ndarray:
  m = np.asarray(mask)
  return (m[..., 0] if m.ndim == 3 else m) > 0.5


def comparison_figure(path: str, rows: list[dict], title: str = "") -> str:
  """Writes a PNG grid: one row per tumor slice.

  Args:
    path: output .png path.
    rows: dicts with 'tumor' (S,S,C) image, 'mask' (S,S,1), 'matches' (list of
      healthy images), and optional 'cutpaste', 'anomalydiffusion', 'dfgm'.
    title: figure title.
  """
  plt = _pyplot()
  n_match = max(len(r["matches"]) for r in rows)
  columns = (["tumor slice (private)"] + [f"match {i + 1} (public)" for i in range(n_match)]
             + [c for c in ("cutpaste", "anomalydiffusion", "dfgm") if c in rows[0]])
  fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                           figsize=(2.0 * len(columns), 2.0 * len(rows) + 0.4))
  for i, row in enumerate(rows):
    images = [row["tumor"]] + list(row["matches"]) + [
        row[c] for c in ("cutpaste", "anomalydiffusion", "dfgm") if c in row]
    for j, img in enumerate(images):
      ax = axes[i, j]
      ax.imshow(_gray(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
      if j == 0 or columns[j] in ("cutpaste", "dfgm"):
        ax.contour(np.asarray(row["mask"])[..., 0], levels=[0.5], colors="red",
                   linewidths=0.6)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(columns[j], fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


# --- Overlays (Figure 3/4) --------------------------------------------------------


def pick_slices(reference: np.ndarray, patients: Sequence[str],
                n: int = OVERLAY_SLICES) -> list[int]:
  """The test slices an overlay figure shows, from the reference masks only.

  Never looks at a prediction, so the choice cannot favour either run: the
  slices with the largest reference tumor, at most one per patient while
  other patients have tumor slices left, then the next largest. Ties go to
  the earlier slice; empty slices only when too few have tumor.

  Args:
    reference: (N,S,S[,1]) reference masks of the test split.
    patients: (N,) patient of each slice.
    n: slices wanted.

  Returns:
    Up to n slice indices, largest tumor first.
  """
  ref = np.asarray(reference)
  area = (ref.reshape(len(ref), -1) > 0.5).sum(axis=1)
  order = [int(i) for i in np.argsort(-area, kind="stable")]
  chosen, seen = [], set()
  for i in order:  # the largest slice of each patient, largest first.
    if len(chosen) < n and area[i] > 0 and str(patients[i]) not in seen:
      chosen.append(i)
      seen.add(str(patients[i]))
  for i in order:  # too few patients: their next largest slices.
    if len(chosen) < n and i not in chosen:
      chosen.append(i)
  return sorted(chosen, key=lambda i: (-area[i], i))


def _overlay(ax, image, fill=None, contour=None, fill_color=_PRED_COLOR):
  ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  if fill is not None and fill.any():
    rgba = np.zeros(fill.shape + (4,))
    rgba[fill] = (*_rgb(fill_color), 0.45)
    ax.imshow(rgba, interpolation="nearest")
  if contour is not None and contour.any() and not contour.all():
    ax.contour(contour.astype(np.float32), levels=[0.5], colors=_REF_COLOR,
               linewidths=0.7)
  ax.set_xticks([])
  ax.set_yticks([])


def _rgb(name: str) -> tuple:
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  return colors.to_rgb(name)


def overlay_figure(path: str, image: np.ndarray, reference: np.ndarray,
                   before: np.ndarray, after: np.ndarray,
                   dice_before: Sequence[float], dice_after: Sequence[float],
                   row_labels: Sequence[str], names: tuple[str, str],
                   modality: str = "image", title: str = "",
                   seeds: tuple = (None, None)) -> str:
  """Test slices with the reference and the predictions of two runs.

  Columns: the image, the reference (filled red), the prediction before and
  after (filled yellow, the reference's outline in red for comparison), each
  prediction titled with its per-slice Dice.

  Args:
    path: output .png path.
    image: (R,S,S,C) the slices in [-1, 1]; the first channel is shown.
    reference, before, after: (R,S,S[,1]) masks in {0, 1}.
    dice_before, dice_after: (R,) per-slice Dice of the two predictions.
    row_labels: (R,) e.g. patient and slice.
    names: the two runs' names, e.g. ("A", "B").
    modality: the shown channel's name.
    title: figure title.
    seeds: the seed whose predictions each run shows (in the column titles).
  """
  plt = _pyplot()
  rows = len(image)
  tags = [f", seed {s}" if s is not None else "" for s in seeds]
  fig, axes = plt.subplots(rows, 4, squeeze=False, figsize=(8.0, 2.1 * rows + 0.5))
  for i in range(rows):
    ref = _plane(reference[i])
    _overlay(axes[i, 0], image[i])
    _overlay(axes[i, 1], image[i], fill=ref, fill_color=_REF_COLOR)
    _overlay(axes[i, 2], image[i], fill=_plane(before[i]), contour=ref)
    _overlay(axes[i, 3], image[i], fill=_plane(after[i]), contour=ref)
    axes[i, 0].set_title(f"{modality}\n{row_labels[i]}", fontsize=7)
    axes[i, 1].set_title("reference", fontsize=7)
    axes[i, 2].set_title(f"before ({names[0]}{tags[0]})\nDice {dice_before[i]:.3f}",
                         fontsize=7)
    axes[i, 3].set_title(f"after ({names[1]}{tags[1]})\nDice {dice_after[i]:.3f}",
                         fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  _overlay_legend(fig)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  return _save(fig, path)


def _overlay_legend(fig) -> None:
  """What the colours mean, below the panels."""
  from matplotlib import lines, patches  # pylint: disable=g-import-not-at-top
  handles = [patches.Patch(facecolor=_REF_COLOR, alpha=0.45, label="reference (filled)"),
             lines.Line2D([], [], color=_REF_COLOR, linewidth=0.9,
                          label="reference outline"),
             patches.Patch(facecolor=_PRED_COLOR, alpha=0.45,
                           label="prediction (probability > 0.5)")]
  fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)


# --- Dice per run ------------------------------------------------------------------


# What the Dice chart says beside the paper's values, per data source.
PHANTOM_NOTE = ("phantom Dice is not comparable with the paper's BraTS Dice:\n"
                "the paper's values are not shown")
UNKNOWN_NOTE = ("data source unknown: the paper's values (diamonds) are\n"
                "BraTS Dice, comparable only on BraTS")


def dice_figure(path: str, runs: Mapping[str, dict], title: str = "",
                source_kind: str = "unknown") -> str:
  """Mean Dice per run: a bar, one dot per seed, the std as an error bar.

  Args:
    path: output .png path.
    runs: run id -> {"seeds": {seed: {"dice": ...}}, "mean": {"dice"},
      "std": {"dice"}, "paper_dice": float or None} (results.json's runs).
    title: figure title.
    source_kind: the data's source ("phantom", "real", "unknown"): phantom
      Dice is not drawn beside the paper's BraTS Dice (a note says why);
      unknown draws them with a note.
  """
  plt = _pyplot()
  ids = list(runs)
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(ids), 3.4))
  x = np.arange(len(ids))
  means = [runs[r]["mean"]["dice"] for r in ids]
  stds = [runs[r]["std"]["dice"] for r in ids]
  ax.bar(x, means, width=0.6, color="#9ecae1", edgecolor="#3182bd",
         label="mean over seeds")
  ax.errorbar(x, means, yerr=stds, fmt="none", ecolor="black", capsize=4,
              linewidth=1, label="std over seeds")
  for i, r in enumerate(ids):
    dice = [s["dice"] for s in runs[r]["seeds"].values()]
    # A fixed spread, so the seeds of a run do not hide each other.
    offsets = np.linspace(-0.15, 0.15, len(dice)) if len(dice) > 1 else [0.0]
    ax.scatter(i + np.asarray(offsets), dice, s=14, color="#08306b", zorder=3,
               label="one seed" if i == 0 else None)
  paper = [(i, runs[r]["paper_dice"]) for i, r in enumerate(ids)
           if runs[r].get("paper_dice") is not None]
  note = {"phantom": PHANTOM_NOTE, "real": ""}.get(source_kind, UNKNOWN_NOTE)
  if paper and source_kind != "phantom":
    ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="D", s=28,
               facecolors="none", edgecolors="red", zorder=4, label="paper (BraTS)")
  if note:
    fig.set_size_inches(max(fig.get_size_inches()[0], 5.0), 3.9)
    fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=7)
  ax.set_xticks(x)
  ax.set_xticklabels(ids, fontsize=8, rotation=30 if len(ids) > 5 else 0)
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("mean per-slice Dice")
  ax.legend(fontsize=7, loc="upper right")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout(rect=(0, 0.09 if note else 0, 1, 1))
  return _save(fig, path)


# --- Training curves ------------------------------------------------------------


def curves_figure(path: str, panels: Mapping[str, Mapping[str, Mapping[str, tuple]]],
                  title: str = "") -> str:
  """Training loss against optimizer step: runs compared on one axis.

  Each panel holds some runs (a gain's before and after), one colour per
  run: each seed a thin line, their mean (when the seeds share their steps)
  a thick one labelled with the run's last step, so that a difference of
  budget between the runs is visible.

  Args:
    path: output .png path.
    panels: panel title -> run id -> seed -> (steps, losses); a run without
      rows is named in its panel as having none.
    title: figure title.
  """
  plt = _pyplot()
  names = list(panels)
  cols = min(len(names), 3)
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, squeeze=False,
                           figsize=(3.6 * cols, 2.8 * rows + 0.4))
  for k, ax in enumerate(axes.flat):
    if k >= len(names):
      ax.axis("off")
      continue
    ax.set_title(names[k], fontsize=8)
    empty = []
    for j, (rid, seeds) in enumerate(panels[names[k]].items()):
      color = f"C{j}"
      if not seeds:
        empty.append(rid)
        continue
      for steps, loss in seeds.values():
        ax.plot(steps, loss, color=color, linewidth=0.6, alpha=0.45)
      step_lists = [list(st) for st, _ in seeds.values()]
      last = max(st[-1] for st in step_lists if st)
      label = f"{rid}: {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, {last} steps"
      if all(st == step_lists[0] for st in step_lists):
        mean = np.mean([np.asarray(l, np.float64) for _, l in seeds.values()], axis=0)
        ax.plot(step_lists[0], mean, color=color, linewidth=1.6,
                marker="." if len(step_lists[0]) < 20 else None, label=label + " (mean)")
      else:
        ax.plot([], [], color=color, linewidth=1.6, label=label)
    if empty:
      ax.text(0.5, 0.5, f"no metrics: run {', '.join(empty)}", ha="center",
              va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("optimizer step", fontsize=7)
    ax.set_ylabel("loss", fontsize=7)
    ax.tick_params(labelsize=7)
    if len(empty) < len(panels[names[k]]):
      ax.legend(fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)
