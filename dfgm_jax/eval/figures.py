"""Figures: the comparison grid in the style of the paper's Figure 2."""

from __future__ import annotations

import numpy as np


def _gray(img: np.ndarray) -> np.ndarray:
  return np.clip((np.asarray(img)[..., 0] + 1.0) / 2.0, 0.0, 1.0)


def comparison_figure(path: str, rows: list[dict], title: str = "") -> str:
  """Writes a PNG grid: one row per tumor slice.

  Args:
    path: output .png path.
    rows: dicts with 'tumor' (S,S,C) image, 'mask' (S,S,1), 'matches' (list of
      healthy images), and optional 'cutpaste', 'anomalydiffusion', 'dfgm'.
    title: figure title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
