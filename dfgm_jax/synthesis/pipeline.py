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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dfgm_jax.diffusion import sampler as sampler_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.synthesis import compose
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import matching
from dfgm_jax.synthesis import modes


def salted_hash(text: str, salt: str) -> str:
  """Pseudonym of an identifier: 16 hex digits of sha256(salt | text)."""
  return hashlib.sha256(f"{salt}|{text}".encode()).hexdigest()[:16]


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
  features: np.ndarray    # (N,g,g,F) float16
  backend: str


def build_bank(images, brain, case_ids, keys, backend: str, seed: int = 0,
               cache_path: str | None = None) -> MemoryBank:
  """Computes (or loads from `cache_path`) the features of the healthy set."""
  patients = np.array([patient_code(c) for c in case_ids], np.int32)
  fingerprint = hashlib.sha256(("|".join(keys) + backend).encode()).hexdigest()[:16]
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
  r_out: int = 3
  r_in: int = 0
  batch_size: int = 8
  seed: int = 0
  salt: str = ""


def synthesize(settings: SynthesisSettings, bank: MemoryBank, tumors: dict,
               eps_fn_factory: Callable | None, params, sched: schedule_lib.Schedule,
               scfg: sampler_lib.SamplerConfig, progress: Callable | None = None
               ) -> dict:
  """Synthetic pairs for the tumor slices of one center.

  Args:
    settings: mode, matching and placement.
    bank: the memory bank.
    tumors: dict with image (M,S,S,C), mask (M,S,S,1), case_id, center,
      slice_index (length-M sequences).
    eps_fn_factory: params -> eps_fn (the trained denoiser); None for modes
      without diffusion.
    params: the denoiser's parameters (EMA), passed as jit arguments.
    sched, scfg: noise schedule and sampler settings.
    progress: called with the number of pairs done after each batch.

  Returns:
    dict of arrays image, mask (pairs) and provenance lists: source (salted
    case hash), center, slice_index, healthy (salted key of the healthy slice),
    rank (0..k-1).
  """
  if settings.mode == "real_only":
    raise ValueError("real_only produces no synthetic set")
  feat_params, feat_fn = matching.feature_extractor(settings.match.backend, settings.seed)
  bank_features = jnp.asarray(bank.features)
  bank_brain = jnp.asarray(bank.brain)
  bank_patients = jnp.asarray(bank.patients)
  match_fn = jax.jit(lambda fp, img, t, d, q: matching.match(
      settings.match, feat_fn(fp, img).astype(jnp.float16), t, d, q,
      bank_features, bank_brain, bank_patients))
  gen_fn = jax.jit(lambda p, x, t, h, idx: modes.synthesize_batch(
      settings.mode, eps_fn_factory(p) if eps_fn_factory else None, sched, scfg,
      x, t, h, jax.random.key(settings.seed), idx, settings.r_out, settings.r_in))

  rng = np.random.default_rng(settings.seed)
  images, masks_out, prov = [], [], {k: [] for k in
                                     ("source", "center", "slice_index", "healthy", "rank")}
  n = len(tumors["image"])
  pairs = []
  for lo in range(0, n, settings.batch_size):
    sl = slice(lo, min(lo + settings.batch_size, n))
    t = jnp.asarray(tumors["mask"][sl], jnp.float32)
    codes = jnp.asarray([patient_code(c) for c in tumors["case_id"][sl]], jnp.int32)
    idx, _, valid = match_fn(feat_params, jnp.asarray(tumors["image"][sl]), t,
                             masks.dilate(t, settings.r_out), codes)
    idx, valid = np.asarray(idx), np.asarray(valid)
    for qi in range(idx.shape[0]):
      for rank in range(idx.shape[1]):
        if valid[qi, rank]:
          pairs.append((lo + qi, int(idx[qi, rank]), rank))
  for lo in range(0, len(pairs), settings.batch_size):
    chunk = pairs[lo:lo + settings.batch_size]
    xs, ts, hs, index = [], [], [], []
    for q, j, rank in chunk:
      x, t, _ = compose.place(tumors["image"][q], tumors["mask"][q].astype(np.float32),
                              bank.brain[j], rng, settings.placement, settings.hflip,
                              min_inside=settings.match.min_inside_brain)
      xs.append(x), ts.append(t), hs.append(bank.images[j])
      index.append(q * settings.match.k + rank)
      prov["source"].append(salted_hash(tumors["case_id"][q], settings.salt))
      prov["center"].append(tumors["center"][q])
      prov["slice_index"].append(int(tumors["slice_index"][q]))
      prov["healthy"].append(salted_hash(bank.keys[j], settings.salt))
      prov["rank"].append(rank)
    pad = settings.batch_size - len(chunk)  # one compiled shape for every batch.
    stack = lambda a: np.concatenate([np.stack(a)] + [np.stack(a[:1])] * pad)
    out = gen_fn(params, stack(xs), stack(ts), stack(hs),
                 np.asarray(index + [0] * pad, np.int32))
    images.append(np.asarray(out)[:len(chunk)])
    masks_out.append(np.stack(ts).astype(np.uint8))
    if progress:
      progress(len(chunk))
  return {"image": np.concatenate(images) if images else np.zeros((0,)),
          "mask": np.concatenate(masks_out) if masks_out else np.zeros((0,)),
          **prov}
