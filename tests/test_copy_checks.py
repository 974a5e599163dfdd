"""The audit's region checks on near copies and on clean data (privacy/audit.py).

Synthetic anatomy built here: each patient is an elliptic brain with its own
smooth intensity field and a tumor disc, its slices drift slowly along the
axis (neighbouring slices are alike, as in MRI), and every slice has its own
texture noise. Training, held-out and candidate patients are disjoint, so a
candidate of a fresh patient is an independent real slice: it must come out
"ok", and copies of training slices, exact or moved a little, must come out
"copies" in every region that is not the tumor.
"""

import numpy as np
import pytest

from dfgm_jax.privacy import audit
from dfgm_jax.privacy import distances

SIDE = 24
SLICES = 6
REGIONS = ("full", "ring", "background")


def _patient(rng, n_slices=SLICES):
  """(images, tumor, ring) of one patient: (n, SIDE, SIDE) each, images in [-1, 1]."""
  yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1) * 2 - 1
  a, b = rng.uniform(0.65, 0.85, 2)
  cy, cx = rng.uniform(-0.08, 0.08, 2)
  centers = rng.uniform(-0.6, 0.6, (6, 2))
  amps = rng.uniform(-0.5, 0.5, 6)
  widths = rng.uniform(0.15, 0.35, 6)
  drift = rng.normal(0, 0.04, (6, 2))
  ty, tx = rng.uniform(-0.4, 0.4, 2)
  radius = rng.uniform(2.0, 3.5)
  images, tumor, ring = [], [], []
  for z in range(n_slices):
    scale = 1 - 0.03 * z
    brain = ((yy - cy) / (a * scale)) ** 2 + ((xx - cx) / (b * scale)) ** 2 < 1
    c = centers + z * drift
    field = 0.1 + sum(amp * np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * w * w))
                      for amp, p, w in zip(amps, c, widths))
    field = field + rng.normal(0, 0.03, field.shape)
    dist = np.hypot((yy - ty) * (SIDE - 1) / 2, (xx - tx) * (SIDE - 1) / 2)
    disc = (dist < radius - 0.2 * z) & brain
    img = np.where(brain, np.clip(field, -0.9, 1.0), -1.0)
    img = np.where(disc, 0.8, img)
    images.append(img)
    tumor.append(disc)
    ring.append((dist < radius - 0.2 * z + 2) & ~disc)
  return (np.asarray(images, np.float32), np.asarray(tumor, np.float32),
          np.asarray(ring, np.float32))


def _cohort(rng, n_patients):
  parts = [_patient(rng) for _ in range(n_patients)]
  images, tumor, ring = (np.concatenate(p) for p in zip(*parts))
  return images, tumor, ring, np.repeat([f"p{i}" for i in range(n_patients)], SLICES)


def _regions(tumor, ring):
  return {k: v[..., None] for k, v in distances.region_masks(tumor, ring).items()}


def _moved(x, dy, dx, fill):
  out = np.full_like(x, fill)
  out[max(dy, 0):SIDE + min(dy, 0), max(dx, 0):SIDE + min(dx, 0)] = x[
      max(-dy, 0):SIDE + min(-dy, 0), max(-dx, 0):SIDE + min(-dx, 0)]
  return out


def _check(cands, c_tumor, c_ring, held, held_patients, train, settings=None,
           groups=None):
  """Region checks and verdicts of (N, SIDE, SIDE) sets (held-out: (images, tumor,
  ring)); groups: the candidates' patients."""
  res = audit.region_checks(cands[..., None], held[0][..., None], train[..., None],
                            _regions(c_tumor, c_ring), _regions(held[1], held[2]),
                            settings or audit.Settings(), heldout_patients=held_patients,
                            candidate_groups=groups)
  return res, {r: audit.region_verdict(r, res[r], synthetic=True) for r in res}


PLANTS = {
    "exact": lambda x, fill, rng: x,
    "noisy": lambda x, fill, rng: (np.clip(x + rng.normal(0, 0.02, x.shape), -1, 1)
                                   if fill == -1.0 else x),
    "shifted 1 px": lambda x, fill, rng: _moved(x, 1, 0, fill),
    "shifted 2 px": lambda x, fill, rng: _moved(x, -2, 1, fill),
    "mirrored left-right": lambda x, fill, rng: np.flip(x, 1),
    "mirrored up-down": lambda x, fill, rng: np.flip(x, 0),
    "turned 90 deg": lambda x, fill, rng: np.rot90(x, 1),
}


def test_planted_near_copies_are_copies_in_every_region():
  rng = np.random.default_rng(0)
  train, t_tumor, t_ring, _ = _cohort(rng, 8)
  held = _cohort(rng, 6)
  fresh, f_tumor, f_ring, _ = _cohort(rng, 2)
  # Four plants of each kind, of different training slices; the plant's
  # masks move with its image (a synthetic set carries its own masks).
  sources = rng.choice(len(train), size=4 * len(PLANTS), replace=False)
  planted = {"image": [], "tumor": [], "ring": []}
  kinds = []
  for j, (kind, plant) in enumerate(PLANTS.items()):
    for s in sources[4 * j:4 * j + 4]:
      rng_plant = np.random.default_rng(int(s))
      planted["image"].append(plant(train[s], -1.0, rng_plant))
      planted["tumor"].append(plant(t_tumor[s], 0.0, rng_plant))
      planted["ring"].append(plant(t_ring[s], 0.0, rng_plant))
      kinds.append(kind)
  cands = np.concatenate([np.asarray(planted["image"]), fresh])
  c_tumor = np.concatenate([np.asarray(planted["tumor"]), f_tumor])
  c_ring = np.concatenate([np.asarray(planted["ring"]), f_ring])
  res, verdicts = _check(cands, c_tumor, c_ring, held[:3], held[3], train)

  n_planted = len(kinds)
  for region in REGIONS:
    r = res[region]
    assert r["reference"]["n_patients"] == 6 and not r["reference"]["too_small"]
    missed = [kinds[i] for i in range(n_planted) if i not in r["copies"]["copies"]]
    assert missed == [], (region, missed)
    # The copies found are the plants (the fresh patients' slices are not).
    assert r["copies"]["copies"] == list(range(n_planted)), region
    assert np.all(np.asarray(r["nearest_index"][:n_planted]) == sources), region
    assert verdicts[region][0] == "copies", verdicts[region]
    assert verdicts[region][1].startswith(f"{region}: COPIES, ")
  # Exact and moved copies sit at exactly 0 on the full image; noisy ones near
  # the noise level, far under the nearest held-out slice.
  d = np.asarray(res["full"]["nearest_distance"][:n_planted])
  noisy = np.asarray(kinds) == "noisy"
  np.testing.assert_array_equal(d[~noisy & ~np.char.startswith(kinds, "shifted")], 0.0)
  assert np.all(d[noisy] < 0.03)
  assert d[noisy].max() < res["full"]["copies"]["copy_distance"]
  assert res["full"]["nearest_transform"][kinds.index("turned 90 deg")] == "270 deg"
  assert verdicts["tumor"][0] == "by design"
  v = {f"region {r}": {"status": s, "text": t} for r, (s, t) in verdicts.items()}
  assert audit.overall(v) == "fail"


def _clean_draw(seed, settings=None, held_patients=6):
  rng = np.random.default_rng(seed)
  train, _, _, _ = _cohort(rng, 8)
  held = _cohort(rng, held_patients)
  cands = _cohort(rng, 4)
  return _check(cands[0], cands[1], cands[2], held[:3], held[3], train, settings,
                groups=cands[3])


def _ok_fraction(n_draws):
  statuses = []
  for seed in range(n_draws):
    _, verdicts = _clean_draw(1000 + seed)
    statuses.append({verdicts[r][0] for r in REGIONS})
  return np.mean([s == {"ok"} for s in statuses]), statuses


def test_independent_slices_are_ok_in_95_percent_of_draws():
  fraction, statuses = _ok_fraction(20)
  assert fraction >= 0.95, statuses


@pytest.mark.slow
def test_independent_slices_are_ok_in_95_percent_of_100_draws():
  fraction, statuses = _ok_fraction(100)
  assert fraction >= 0.95, [s for s in statuses if s != {"ok"}]


def test_a_small_reference_says_so_and_still_sees_copies():
  res, verdicts = _clean_draw(7, held_patients=3)
  for region in REGIONS:
    status, text = verdicts[region]
    assert status == "reference too small", text
    assert "3 held-out patients" in text and "at least 5" in text
    assert "add held-out patients" in text
  v = {f"region {r}": {"status": s, "text": t} for r, (s, t) in verdicts.items()}
  assert audit.overall(v) == "not shown"
  # The threshold is reported with its (wide) interval all the same.
  dcr = res["full"]["dcr"]
  assert dcr["threshold_low"] <= dcr["threshold"] <= dcr["threshold_high"]
  # Exact copies need no calibration: a training split is copies.
  rng = np.random.default_rng(7)
  train, t_tumor, t_ring, _ = _cohort(rng, 8)
  held = _cohort(rng, 3)
  _, verdicts = _check(train, t_tumor, t_ring, held[:3], held[3], train)
  assert {verdicts[r][0] for r in REGIONS} == {"copies"}
  # A setting of the minimum: 3 patients then calibrate.
  _, verdicts = _clean_draw(7, audit.Settings(min_heldout_patients=3), held_patients=3)
  assert {verdicts[r][0] for r in REGIONS} <= {"ok", "warning"}
