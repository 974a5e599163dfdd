"""Cut-paste composition of a private tumor into a public healthy slice.

  y = M * x + (1 - M) * h        the synthetic sample's label is M

Placement (ALGORITHM.md 3): `same` keeps native coordinates (slices are
atlas-registered); `random_shift` moves (x*M, M) jointly by up to +-12 % of the
image, retrying until the tumor lies inside the healthy brain; `hflip` mirrors
tumor and mask together (a mirrored tumor that leaves the brain is tried
unmirrored; a pair with no placement inside the brain is skipped).
`config.synthesis.intensity_match = 'ring_mean'` rescales the pasted tumor by
mean(h on the ring) / mean(x on the ring) (`match_intensity`); 'none', the
default, pastes it as it is.
"""

from __future__ import annotations

import numpy as np

PLACEMENTS = ("same", "random_shift")
INTENSITY_MATCHES = ("none", "ring_mean")


def cut_paste(x: np.ndarray, tumor: np.ndarray, h: np.ndarray) -> np.ndarray:
  """(..., S, S, C) composite; exact: y == x on M and y == h elsewhere."""
  m = tumor.astype(bool)
  return np.where(m, x, h).astype(np.float32)


def _shift(a: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
  out = np.full_like(a, fill)
  s = a.shape[0]
  ys, yd = (slice(0, s - dy), slice(dy, s)) if dy >= 0 else (slice(-dy, s), slice(0, s + dy))
  xs, xd = (slice(0, s - dx), slice(dx, s)) if dx >= 0 else (slice(-dx, s), slice(0, s + dx))
  out[yd, xd] = a[ys, xs]
  return out


def place(x: np.ndarray, tumor: np.ndarray, healthy_brain: np.ndarray,
          rng: np.random.Generator, placement: str = "same", hflip: bool = False,
          max_shift: float = 0.12, min_inside: float = 0.95, retries: int = 20):
  """Moves one tumor slice (S,S,C) and its mask (S,S,1) before pasting.

  With `hflip`, a coin decides whether to mirror; a mirrored tumor that finds
  no place inside the healthy brain is tried unmirrored (the match was chosen
  for the unmirrored tumor), so a flip never pushes a tumor out of the brain.

  Returns:
    (x, tumor, ok): the moved image and mask; ok is False when no placement
    (mirrored or not, shifted within `retries` or not) put the tumor inside
    the healthy brain. The caller must then skip the pair: the returned,
    unmoved tumor does not fit this brain.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"unknown placement {placement!r}; expected {PLACEMENTS}")
  # The coin is drawn first and only when hflip is on, as before, so pairs
  # that placed fine keep their random stream (and their images).
  flips = (True, False) if hflip and rng.random() < 0.5 else (False,)
  for flip in flips:
    xf, tf = (x[:, ::-1], tumor[:, ::-1]) if flip else (x, tumor)
    moved = _place_unflipped(xf, tf, healthy_brain, rng, placement, max_shift,
                             min_inside, retries)
    if moved is not None:
      return moved[0], moved[1], True
  return x, tumor, False


def _place_unflipped(x, tumor, healthy_brain, rng, placement, max_shift, min_inside,
                     retries):
  """(x, tumor) placed inside the brain, or None when no placement is."""
  area = max(float(tumor.sum()), 1.0)

  def inside(m):
    return float((m * healthy_brain).sum()) / area >= min_inside

  if placement == "random_shift":
    limit = int(round(max_shift * x.shape[0]))
    for _ in range(retries):
      dy, dx = rng.integers(-limit, limit + 1, size=2)
      moved = _shift(tumor, int(dy), int(dx), 0.0)
      if moved.sum() == tumor.sum() and inside(moved):
        return _shift(x, int(dy), int(dx), -1.0), moved
  # `same`, or no shift found: the native position, when it is inside.
  return (x, tumor) if inside(tumor) else None


def match_intensity(x: np.ndarray, h: np.ndarray, ring: np.ndarray) -> np.ndarray:
  """Scales x (in [0, 2] space) so its ring mean matches h's ring mean."""
  r = ring.astype(bool)[..., 0]
  if not r.any():
    return x
  xs, hs = x[r] + 1.0, h[r] + 1.0
  scale = float(hs.mean()) / max(float(xs.mean()), 1e-6)
  return np.clip((x + 1.0) * scale - 1.0, -1.0, 1.0).astype(np.float32)
