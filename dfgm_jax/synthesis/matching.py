"""Memory bank of public healthy slices and top-k L2 matching (ALGORITHM.md 2).

For each private tumor slice x with mask M, the k closest healthy slices h of
the bank, by a masked squared L2 over a spatial feature grid:

  w_c    = 1 - maxpool_to_grid(D)_c      cells touched by the dilated tumor
                                         are ignored (mask_tumor=True)
  d(x,h) = sum_c w_c ||phi_c(x) - phi_c(h)||^2 / max(sum_c w_c, 1)

computed for the whole bank with one einsum per bank chunk, on device. A
candidate is valid when the tumor lies inside its brain (|M and B_h| / |M| >=
min_inside), it is not from the same patient (exclude_same_patient), and it is
not already chosen (top_k returns distinct entries).

Backends (recorded with every synthetic set): `vgg16_imagenet` (pool5 7x7x512
of VGG16 with ImageNet weights), `vgg16_random`, `pixels` (32x32 area
downsample of the image).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dfgm_jax.models import vgg

BACKENDS = ("vgg16_imagenet", "vgg16_random", "pixels")
PIXEL_GRID = 32


@dataclasses.dataclass(frozen=True)
class MatchConfig:
  backend: str = "vgg16_imagenet"
  k: int = 2
  mask_tumor: bool = True
  min_inside_brain: float = 0.95
  exclude_same_patient: bool = True
  chunk: int = 256  # bank entries per distance block


def feature_extractor(backend: str, seed: int = 0):
  """(params, fn): fn(params, images (B,S,S,1)) -> (B, g, g, C) features."""
  if backend == "pixels":
    def pixels(_, images):
      b, s = images.shape[0], images.shape[1]
      if s % PIXEL_GRID:
        return jax.image.resize(images, (b, PIXEL_GRID, PIXEL_GRID, images.shape[-1]),
                                "linear", antialias=True)
      f = s // PIXEL_GRID
      return images.reshape(b, PIXEL_GRID, f, PIXEL_GRID, f, -1).mean(axis=(2, 4))
    return None, pixels
  if backend == "vgg16_imagenet":
    return vgg.load_imagenet_weights(), vgg.features
  if backend == "vgg16_random":
    return vgg.random_weights(seed), vgg.features
  raise ValueError(f"unknown matching backend {backend!r}; expected {BACKENDS}")


def compute_features(params, fn, images: np.ndarray, batch: int = 32) -> np.ndarray:
  """Features of many images in batches; float16 to halve the bank's size."""
  jitted = jax.jit(fn)
  out = [np.asarray(jitted(params, jnp.asarray(images[i:i + batch])), np.float16)
         for i in range(0, len(images), batch)]
  return np.concatenate(out) if out else np.zeros((0,), np.float16)


def grid_weights(dilated: jax.Array, grid: int) -> jax.Array:
  """1 - max-pool of the dilated tumor (B,S,S,1) onto the (grid, grid) cells."""
  b, s = dilated.shape[0], dilated.shape[1]
  if s % grid:
    up = grid * -(-s // grid)
    dilated = jax.image.resize(dilated, (b, up, up, 1), "nearest")
    s = up
  f = s // grid
  pooled = dilated.reshape(b, grid, f, grid, f).max(axis=(2, 4))
  return 1.0 - pooled


def masked_distances(query: jax.Array, bank: jax.Array, weights: jax.Array
                     ) -> jax.Array:
  """(B, N) weighted squared L2 between (B,g,g,C) queries and (N,g,g,C) bank."""
  q = query.astype(jnp.float32)
  h = bank.astype(jnp.float32)
  qq = jnp.sum(q * q, axis=-1)                       # (B,g,g)
  hh = jnp.sum(h * h, axis=-1)                       # (N,g,g)
  qh = jnp.einsum("bijc,nijc->bnij", q, h)           # (B,N,g,g)
  per_cell = qq[:, None] + hh[None] - 2.0 * qh
  d = jnp.einsum("bij,bnij->bn", weights, jnp.maximum(per_cell, 0.0))
  return d / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)[:, None]


def inside_fraction(tumor: jax.Array, brains: jax.Array) -> jax.Array:
  """(B, N) share of each tumor's pixels inside each bank slice's brain."""
  t = tumor.reshape(tumor.shape[0], -1).astype(jnp.float32)
  br = brains.reshape(brains.shape[0], -1).astype(jnp.float32)
  return (t @ br.T) / jnp.maximum(t.sum(axis=1), 1.0)[:, None]


def match(cfg: MatchConfig, query_features: jax.Array, tumor: jax.Array,
          dilated: jax.Array, query_patient: jax.Array, bank_features: jax.Array,
          bank_brain: jax.Array, bank_patient: jax.Array):
  """Top-k valid matches of each query.

  Args:
    cfg: matching settings.
    query_features: (B, g, g, C) features of the tumor slices.
    tumor, dilated: (B, S, S, 1) the tumor masks and their dilation.
    query_patient, bank_patient: (B,), (N,) int32 patient codes (hashes).
    bank_features: (N, g, g, C); bank_brain: (N, S, S, 1) brain masks.

  Returns:
    (indices (B, k) int32, distances (B, k), valid (B, k) bool): entries with
    valid False are padding (fewer than k valid candidates).
  """
  grid = query_features.shape[1]
  if cfg.mask_tumor:
    w = grid_weights(dilated, grid)
  else:
    w = jnp.ones((tumor.shape[0], grid, grid), jnp.float32)
  chunks = []
  for lo in range(0, bank_features.shape[0], cfg.chunk):
    sl = slice(lo, lo + cfg.chunk)
    d = masked_distances(query_features, bank_features[sl], w)
    ok = inside_fraction(tumor, bank_brain[sl]) >= cfg.min_inside_brain
    if cfg.exclude_same_patient:
      ok &= query_patient[:, None] != bank_patient[None, sl]
    chunks.append(jnp.where(ok, d, jnp.inf))
  dist = jnp.concatenate(chunks, axis=1)
  k = min(cfg.k, dist.shape[1])
  neg, idx = jax.lax.top_k(-dist, k)
  return idx.astype(jnp.int32), -neg, jnp.isfinite(neg)
