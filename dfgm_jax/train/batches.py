"""Training batches mixing public healthy and private tumor slices (numpy).

The sampler is a pure function of (seed, step, process): batch(step) draws
every slot from the healthy pool with probability p_healthy and from the tumor
pool otherwise, with replacement. So a resumed run sees exactly the batches an
uninterrupted one would, and the data position to checkpoint is the step.
"""

from __future__ import annotations

import numpy as np


def select_n_shot(num_examples: int, n_shot: int, seed: int) -> np.ndarray:
  """Indices of the n_shot private examples a client may use (0 = all)."""
  if n_shot <= 0 or n_shot >= num_examples:
    return np.arange(num_examples)
  rng = np.random.default_rng([seed, 7])
  return np.sort(rng.choice(num_examples, n_shot, replace=False))


class MixedSampler:
  """Host-local batches for the diffusion trainer.

  Args:
    healthy: dict with 'image' (N, S, S, C) float32 in [-1, 1] (public).
    tumor: dict with 'image' (M, S, S, C) and 'mask' (M, S, S, 1) (private);
      may be None or empty for public-only training (p_healthy forced to 1).
    batch_size: examples per batch on this process.
    p_healthy: probability that a slot holds a healthy example.
    seed: sampler seed.
    process_index: this process (distinct draws per process).
  """

  def __init__(self, healthy: dict, tumor: dict | None, batch_size: int,
               p_healthy: float, seed: int, process_index: int = 0):
    self.healthy_image = np.asarray(healthy["image"], np.float32)
    if tumor is None or len(tumor["image"]) == 0:
      self.tumor_image = self.tumor_mask = None
      p_healthy = 1.0
    else:
      self.tumor_image = np.asarray(tumor["image"], np.float32)
      self.tumor_mask = np.asarray(tumor["mask"], np.float32)
    if len(self.healthy_image) == 0 and p_healthy > 0:
      raise ValueError("no healthy examples but p_healthy > 0")
    self.batch_size = batch_size
    self.p_healthy = p_healthy
    self.seed = seed
    self.process_index = process_index

  def batch(self, step: int) -> dict:
    rng = np.random.default_rng([self.seed, step, self.process_index])
    is_tumor = rng.random(self.batch_size) >= self.p_healthy
    b = self.batch_size
    shape = self.healthy_image.shape[1:]
    image = np.empty((b,) + shape, np.float32)
    mask = np.zeros((b,) + shape[:2] + (1,), np.float32)
    h_idx = rng.integers(0, max(len(self.healthy_image), 1), b)
    t_idx = rng.integers(0, len(self.tumor_image), b) if self.tumor_image is not None else None
    for i in range(b):
      if is_tumor[i]:
        image[i] = self.tumor_image[t_idx[i]]
        mask[i] = self.tumor_mask[t_idx[i]]
      else:
        image[i] = self.healthy_image[h_idx[i]]
    return {"image": image, "mask": mask, "is_tumor": is_tumor.astype(np.int32)}
