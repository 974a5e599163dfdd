"""Synthesis of one center's tumors into public healthy slices (host loop).

For each private tumor slice: its top-k valid healthy matches from the memory
bank, the tumor placed and pasted into each, then the mode's generation on
device. Outputs carry provenance without raw patient identifiers: case ids
are replaced by salted hashes (the salt stays at the private center).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from dfgm_jax.synthesis import compose
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import matching


def salted_hash(text: str, salt: str) -> str:
  """Pseudonym of an identifier: 16 hex digits of sha256(salt | text)."""
  return hashlib.sha256(f"{salt}|{text}".encode()).hexdigest()[:16]


# What a synthetic example's provenance names (config.synthesis.provenance):
#   slice    one pseudonym per source slice, salted_hash("<case id>/<slice
#            index>"), and no slice index (NO_SLICE_INDEX): the examples of one
#            patient cannot be grouped into a stack, nor ordered;
#   patient  the patient's pseudonym, salted_hash(case id), and the raw slice
#            index: groups and orders a patient's slices (patient-level splits
#            of the synthetic set, for research that needs them).
# Either way the salt, kept at the center, maps an example back to its source
# slice (the privacy audit and the quality report do, through source_rows).
PROVENANCES = ("slice", "patient")
NO_SLICE_INDEX = -1


def source_pseudonym(case_id: str, slice_index: int, salt: str,
                     provenance: str = "slice") -> tuple[str, int]:
  """(source, slice_index) an example of this source slice carries."""
  if provenance == "patient":
    return salted_hash(case_id, salt), int(slice_index)
  if provenance == "slice":
    return salted_hash(f"{case_id}/{int(slice_index)}", salt), NO_SLICE_INDEX
  raise ValueError(f"provenance {provenance!r}: one of {PROVENANCES}")


def source_rows(case_ids, slice_indices, salt: str) -> dict:
  """(source, slice_index) of a synthetic example -> the row of its source
  slice among (case_ids, slice_indices), under either provenance setting."""
  rows = {}
  for i, (case, z) in enumerate(zip(case_ids, slice_indices)):
    for p in PROVENANCES:
      rows[source_pseudonym(str(case), int(z), salt, p)] = i
  return rows


def patient_code(case_id: str) -> int:
  """A stable int32 code of a case id, for on-device same-patient checks."""
  return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class MemoryBank:
  """Public healthy slices and their features."""

  images: np.ndarray      # (N,S,S,C) float32
  brain: np.ndarray       # (N,S,S,1) float32
  patients: np.ndarray    # (N,) int32 patient codes
  keys: list              # (N,) example keys
  features: np.ndarray | None  # (N,g,g,F) float16; None: composition only
  backend: str


def bank_fingerprint(keys, backend: str, seed: int) -> str:
  """What a cached bank's features depend on: the slices (by key), the
  backend and, for the seeded random VGG trunk only, the seed."""
  text = "|".join(keys) + backend
  if backend == "vgg16_random":
    text += f"|seed={int(seed)}"
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_bank(images, brain, case_ids, keys, backend: str, seed: int = 0,
               cache_path: str | None = None, compute_features: bool = True
               ) -> MemoryBank:
  """Computes (or loads from `cache_path`) the features of the healthy set.

  compute_features=False gives a bank for composition only (the processes of a
  multi-host run other than the one that plans the matches).
  """
  patients = np.array([patient_code(c) for c in case_ids], np.int32)
  if not compute_features:
    return MemoryBank(images, brain, patients, list(keys), None, backend)
  fingerprint = bank_fingerprint(keys, backend, seed)
  if cache_path and os.path.exists(cache_path):
    with np.load(cache_path) as f:
      if str(f["fingerprint"]) == fingerprint:
        return MemoryBank(images, brain, patients, list(keys), f["features"], backend)
  params, fn = matching.feature_extractor(backend, seed)
  features = matching.compute_features(params, fn, np.asarray(images))
  if cache_path:
    tmp = cache_path + ".tmp.npz"
    np.savez(tmp, features=features, fingerprint=np.asarray(fingerprint))
    os.replace(tmp, cache_path)
  return MemoryBank(images, brain, patients, list(keys), features, backend)


@dataclasses.dataclass(frozen=True)
class SynthesisSettings:
  mode: str = "dfgm"
  match: matching.MatchConfig = matching.MatchConfig()
  placement: str = "same"
  hflip: bool = False
  intensity_match: str = "none"  # none | ring_mean (compose.match_intensity)
  r_out: int = 3
  r_in: int = 0
  batch_size: int = 8
  seed: int = 0
  salt: str = ""
  provenance: str = "slice"  # PROVENANCES


def plan_pairs(settings: SynthesisSettings, bank: MemoryBank, tumors: dict
               ) -> tuple[np.ndarray, int]:
  """The synthesis plan of one center: (P, 3) int32 rows (query, healthy, rank).

  Every valid match of every tumor slice that can be placed inside its
  healthy brain, in query order then rank order. The plan fixes the work (and
  each pair's global example index query * k + rank) before any generation,
  so that batches can be staged, resumed and spread over processes without
  changing a single output.

  Returns:
    (pairs, skipped): the plan and the number of valid matches left out
    because no placement put the tumor inside the healthy brain.
  """
  if settings.mode == "real_only":
    raise ValueError("real_only produces no synthetic set")
  if bank.features is None:
    raise ValueError("the memory bank has no features (built with compute_features=False)")
  feat_params, feat_fn = matching.feature_extractor(settings.match.backend, settings.seed)
  bank_features = jnp.asarray(bank.features)
  bank_brain = jnp.asarray(bank.brain)
  bank_patients = jnp.asarray(bank.patients)
  # The bank goes in as arguments, not closed over: as constants XLA would
  # fold them at every compile, and each bank would be a program of its own
  # (no reuse through the compilation cache).
  match_fn = jax.jit(lambda fp, img, t, d, q, bf, bb, bp: matching.match(
      settings.match, feat_fn(fp, img).astype(jnp.float16), t, d, q, bf, bb, bp))
  rows = []
  n = len(tumors["image"])
  for lo in range(0, n, settings.batch_size):
    sl = slice(lo, min(lo + settings.batch_size, n))
    t = jnp.asarray(tumors["mask"][sl], jnp.float32)
    codes = jnp.asarray([patient_code(c) for c in tumors["case_id"][sl]], jnp.int32)
    idx, _, valid = match_fn(feat_params, jnp.asarray(tumors["image"][sl]), t,
                             masks.dilate(t, settings.r_out), codes,
                             bank_features, bank_brain, bank_patients)
    idx, valid = np.asarray(idx), np.asarray(valid)
    for qi in range(idx.shape[0]):
      for rank in range(idx.shape[1]):
        if valid[qi, rank]:
          rows.append((lo + qi, int(idx[qi, rank]), rank))
  pairs = np.asarray(rows, np.int32).reshape(-1, 3)
  if settings.placement == "same" and not settings.hflip:
    # The tumor stays where the match checked it lies inside the brain.
    return pairs, 0
  placeable = np.array([_place(settings, bank, tumors, row)[2] for row in pairs], bool)
  return pairs[placeable].reshape(-1, 3), int((~placeable).sum())


def _place(settings: SynthesisSettings, bank: MemoryBank, tumors: dict, row):
  """compose.place of one plan row, with the row's own random stream.

  The generator is seeded by (seed, query, rank), so a pair places the same
  way when planned and when composed, in any batch, on any process.
  """
  q, j, rank = (int(v) for v in row)
  rng = np.random.default_rng([settings.seed, q, rank])
  return compose.place(tumors["image"][q], tumors["mask"][q].astype(np.float32),
                       bank.brain[j], rng, settings.placement, settings.hflip,
                       min_inside=settings.match.min_inside_brain)


def compose_pairs(settings: SynthesisSettings, bank: MemoryBank, tumors: dict,
                  pairs: np.ndarray) -> dict:
  """Network inputs of some plan rows: x (tumor slice placed), tumor, h, index."""
  if settings.intensity_match not in compose.INTENSITY_MATCHES:
    raise ValueError(f"unknown intensity_match {settings.intensity_match!r}; "
                     f"expected one of {compose.INTENSITY_MATCHES}")
  xs, ts, hs = [], [], []
  for row in pairs:
    x, t, _ = _place(settings, bank, tumors, row)
    h = bank.images[int(row[1])]
    if settings.intensity_match == "ring_mean":
      ring = np.asarray(masks.ring(jnp.asarray(t[None]), settings.r_out))[0]
      x = compose.match_intensity(x, h, ring)
    xs.append(x), ts.append(t), hs.append(h)
  return {"x": np.stack(xs).astype(np.float32), "tumor": np.stack(ts).astype(np.float32),
          "h": np.stack(hs).astype(np.float32),
          "index": (pairs[:, 0] * settings.match.k + pairs[:, 2]).astype(np.int32)}


def provenance(settings: SynthesisSettings, bank: MemoryBank, tumors: dict,
               pairs: np.ndarray) -> dict:
  """Per-pair provenance without raw identifiers (salted hashes; what it names:
  settings.provenance, see PROVENANCES)."""
  sources = [source_pseudonym(tumors["case_id"][q], tumors["slice_index"][q],
                              settings.salt, settings.provenance) for q in pairs[:, 0]]
  return {
      "source": [s for s, _ in sources],
      "center": [tumors["center"][q] for q in pairs[:, 0]],
      "slice_index": [z for _, z in sources],
      "healthy": [salted_hash(bank.keys[j], settings.salt) for j in pairs[:, 1]],
      "rank": [int(r) for r in pairs[:, 2]],
  }


def pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """Pads plan rows to `size` by repeating the first (one compiled shape)."""
  if len(rows) >= size:
    return rows
  return np.concatenate([rows, np.repeat(rows[:1], size - len(rows), axis=0)])
