"""Schedule, masked loss, ring masks, augmentation, sampler, metrics, checkpoints."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfgm_jax import checkpoint as ckpt_lib
from dfgm_jax.diffusion import loss as loss_lib
from dfgm_jax.diffusion import schedule as schedule_lib
from dfgm_jax.synthesis import masks
from dfgm_jax.train import augment as augment_lib
from dfgm_jax.train import batches
from dfgm_jax.train import metrics as metrics_lib


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_tables(kind):
  s = schedule_lib.make_schedule(kind, 1000)
  ac = np.asarray(s.alphas_cumprod, np.float64)
  assert s.num_steps == 1000
  assert s.alphas_cumprod_prev[0] == 1.0
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], ac[:-1], rtol=1e-6)
  assert np.all(np.diff(ac) < 0) and 0 < ac[-1] < 1e-3
  assert s.posterior_variance[0] == 0.0
  # Posterior mean of x0 itself noised at t is consistent: coefficients sum
  # so that x_t = sqrt(abar) x0 maps back to sqrt(abar_prev) x0.
  t = jnp.array([10, 500, 999])
  x0 = jnp.ones((3, 2, 2, 1))
  mean, _ = schedule_lib.q_posterior(s, x0, schedule_lib.q_sample(s, x0, t, 0 * x0), t)
  np.testing.assert_allclose(mean[:, 0, 0, 0], np.sqrt(s.alphas_cumprod_prev[t]),
                             rtol=1e-5)


def test_q_sample_statistics():
  s = schedule_lib.make_schedule("linear", 1000)
  t = jnp.full((4096,), 300)
  x0 = jnp.full((4096, 1, 1, 1), 0.5)
  x = schedule_lib.q_sample(s, x0, t, jax.random.normal(jax.random.key(0), x0.shape))
  np.testing.assert_allclose(float(x.mean()), 0.5 * float(s.sqrt_alphas_cumprod[300]),
                             atol=0.03)
  np.testing.assert_allclose(float(x.var()), 1 - float(s.alphas_cumprod[300]),
                             rtol=0.06)


def test_masked_loss_single_pixel_and_area_normalisation():
  rng = np.random.default_rng(0)
  eps = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
  eps_hat = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
  w = np.zeros((2, 8, 8, 1), np.float32)
  w[0, 3, 4, 0] = 1.0
  w[1, :4, :4, 0] = 1.0
  out = loss_lib.masked_mse(eps, eps_hat, jnp.asarray(w))
  np.testing.assert_allclose(out[0], (eps[0, 3, 4, 0] - eps_hat[0, 3, 4, 0]) ** 2,
                             rtol=1e-6)
  np.testing.assert_allclose(out[1], np.mean((eps[1, :4, :4] - eps_hat[1, :4, :4]) ** 2),
                             rtol=1e-5)
  # Scaling the region by 4 leaves the loss of a constant error unchanged.
  ones = jnp.ones((2, 8, 8, 1))
  small = loss_lib.masked_mse(ones, 0 * ones, jnp.asarray(w))
  np.testing.assert_allclose(small, [1.0, 1.0])
  full = loss_lib.masked_mse(eps, eps_hat, ones)
  np.testing.assert_allclose(full, np.mean((eps - eps_hat) ** 2, axis=(1, 2, 3)),
                             rtol=1e-5)
  assert float(loss_lib.masked_mse(eps, eps_hat, 0 * ones)[0]) == 0.0


def _blob(size=32):
  m = np.zeros((1, size, size, 1), np.float32)
  m[0, 12:20, 10:18, 0] = 1
  m[0, 11, 14, 0] = 1
  return jnp.asarray(m)


def test_ring_invariants():
  tumor = _blob()
  for r in (1, 3):
    d = masks.dilate(tumor, r)
    m = masks.ring(tumor, r, 0)
    assert float(jnp.sum(m * tumor)) == 0.0        # m and M disjoint.
    np.testing.assert_array_equal(jnp.maximum(m, tumor), d)  # m or M = D.
    assert float(m.sum()) > 0
  assert float(masks.ring(tumor, 0, 0).sum()) == 0.0  # empty only for r_out 0.
  assert masks.radius_for_size(6, 128) == 3 and masks.radius_for_size(6, 256) == 6
  assert masks.radius_for_size(6, 32) == 1 and masks.radius_for_size(0, 128) == 0
  inner = masks.region(tumor, "inner", 2, 1)
  assert float(jnp.sum(inner * tumor)) > 0  # a band inside the tumor too.
  np.testing.assert_array_equal(masks.region(tumor, "dilated", 2), masks.dilate(tumor, 2))


def test_disk_dilation_is_euclidean():
  point = np.zeros((1, 11, 11, 1), np.float32)
  point[0, 5, 5, 0] = 1
  d = np.asarray(masks.dilate(jnp.asarray(point), 2))[0, :, :, 0]
  yy, xx = np.mgrid[:11, :11]
  np.testing.assert_array_equal(d, ((yy - 5) ** 2 + (xx - 5) ** 2 <= 4).astype(np.float32))


def test_augment_moves_image_and_mask_together():
  key = jax.random.key(0)
  img = jnp.where(_blob() > 0, 1.0, -1.0).repeat(16, 0)
  mask = _blob().repeat(16, 0)
  out_img, out_mask = augment_lib.augment(key, img, mask, jnp.ones(16, jnp.int32),
                                          p_flip=0.5, p_rot=1.0, rot_deg=10.0)
  assert set(np.unique(np.asarray(out_mask))) <= {0.0, 1.0}
  # The tumor stays where the mask is: bright pixels coincide with the mask.
  bright = np.asarray(out_img) > 0
  agree = np.mean(bright == (np.asarray(out_mask) > 0))
  assert agree > 0.98
  flipped = np.asarray(augment_lib.augment(key, img, mask, jnp.zeros(16, jnp.int32),
                                           1.0, 1.0, 10.0)[1])
  np.testing.assert_array_equal(flipped, np.asarray(mask)[:, :, ::-1])  # no rotation for healthy.


def test_mixed_sampler_is_step_indexed():
  healthy = {"image": np.zeros((10, 4, 4, 1), np.float32)}
  tumor = {"image": np.ones((5, 4, 4, 1), np.float32),
           "mask": np.ones((5, 4, 4, 1), np.float32)}
  s = batches.MixedSampler(healthy, tumor, 64, p_healthy=0.25, seed=0)
  a, b = s.batch(7), s.batch(7)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(s.batch(8)["is_tumor"], a["is_tumor"])
  frac = np.mean([s.batch(i)["is_tumor"].mean() for i in range(50)])
  assert abs(frac - 0.75) < 0.05
  # Tumor slots carry tumor images and masks; healthy slots zero masks.
  assert np.all(a["image"][a["is_tumor"] == 1] == 1) and np.all(a["mask"][a["is_tumor"] == 0] == 0)
  other = batches.MixedSampler(healthy, tumor, 64, 0.25, seed=0, process_index=1)
  assert not np.array_equal(other.batch(7)["is_tumor"], a["is_tumor"])
  public_only = batches.MixedSampler(healthy, None, 8, 0.5, 0)
  assert public_only.batch(0)["is_tumor"].sum() == 0
  assert len(batches.select_n_shot(100, 5, 0)) == 5
  np.testing.assert_array_equal(batches.select_n_shot(10, 0, 0), np.arange(10))


def test_event_file_reads_back_in_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=2)
  writer.write(5, {"loss": 0.25, "lr": 1e-3})
  writer.write(10, {"loss": 0.125, "lr": 1e-3})
  writer.close()
  (event_file,) = os.listdir(tmp_path / "tensorboard")
  seen, starts = [], []
  for event in tf.compat.v1.train.summary_iterator(str(tmp_path / "tensorboard" / event_file)):
    if event.HasField("session_log"):
      starts.append((event.step, event.session_log.status))
    for v in event.summary.value:
      seen.append((event.step, v.tag, round(v.simple_value, 6)))
  assert (5, "loss", 0.25) in seen and (10, "loss", 0.125) in seen
  # A resumed run tells TensorBoard to drop the interrupted run's later events.
  assert starts == [(2, tf.compat.v1.SessionLog.START)]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2 and '"step": 10' in lines[1]


def test_checkpoint_roundtrip_and_corrupt_latest_falls_back(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
  for step in (1, 2):
    ckpt.save(step, {"w": state["w"] * step, "step": jnp.int32(step)}, {"next_step": step})
  ckpt.wait()
  step, restored, meta = ckpt.restore_latest(state)
  assert step == 2 and meta["next_step"] == 2
  np.testing.assert_array_equal(restored["w"], np.arange(4.0) * 2)
  # Corrupt every file of step 2's state item.
  state_dir = tmp_path / "2" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  ckpt2 = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  step, restored, meta = ckpt2.restore_latest(state)
  assert step == 1 and meta["next_step"] == 1
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  ckpt.close()
  ckpt2.close()
