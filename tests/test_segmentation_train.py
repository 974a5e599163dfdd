"""The segmenter's trainer: it learns, seeds stack, resumes, runs on 2 devices.

One stacked two-seed run (the module's `reference`) is the baseline every
other run is compared with: it keeps the number of compiles (the slow part
on a 2-core CPU) to one per scenario.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import data as data_cfg
from configs import segmentation as seg_cfg
from dfgm_jax import errors
from dfgm_jax.train import segmentation as seg_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
EPOCHS = 4
STEPS_PER_EPOCH = 8  # 64 slices, batch 8.


def make_config(seeds=(0, 1)):
  config = ml_collections.ConfigDict()
  config.data = data_cfg.get_data_config()
  config.data.image_size = SIZE
  config.seg = seg_cfg.get_seg_config()
  # A tiny network that still learns the toy task in a few epochs.
  config.seg.width = 4
  config.seg.depth = 1  # compiles 3x faster than depth 2 on XLA:CPU
  config.seg.lr = 1e-2
  config.seg.batch_size = 8
  # The paper's epoch rule: EPOCHS * STEPS_PER_EPOCH steps.
  config.seg.budget = "epochs"
  config.seg.epochs = EPOCHS
  config.seg.seeds = tuple(seeds)
  config.seg.log_every = 4
  config.seg.checkpoint_every_epochs = 1
  config.seg.async_checkpoints = False
  config.seg.tensorboard = False
  return config


def toy_set(n, seed):
  """Bright squares (5-11 px) on a dark noisy background, and their masks."""
  rng = np.random.default_rng(seed)
  image = (-1.0 + 0.1 * rng.standard_normal((n, SIZE, SIZE, 1))).astype(
      np.float32)
  mask = np.zeros((n, SIZE, SIZE, 1), np.float32)
  for i in range(n):
    s = rng.integers(5, 12)
    y, x = rng.integers(0, SIZE - s, 2)
    image[i, y:y + s, x:x + s] += 1.5
    mask[i, y:y + s, x:x + s] = 1.0
  return image, mask


def mean_dice(prob, mask):
  pred = prob > 0.5
  inter = (pred * mask).sum(axis=(1, 2, 3))
  sets = pred.sum(axis=(1, 2, 3)) + mask.sum(axis=(1, 2, 3))
  return float(np.mean(np.where(sets == 0, 1.0, 2 * inter / np.maximum(sets, 1))))


def flat(model):
  """A model's parameters and BatchNorm averages as {path: array}."""
  leaves = jax.tree_util.tree_leaves_with_path(
      {"params": model.params, "stats": model.batch_stats})
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_same_model(a, b, atol=2e-5):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], atol=atol, rtol=1e-4, err_msg=k)


SHORT = 4  # steps: where one run is compared with another run's program


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Two seeds stacked: stopped after SHORT steps (kept), then resumed to the
  end. Runs of other programs (one seed alone, 2 devices) are compared at
  SHORT steps: their float rounding differs, and Adam amplifies that over
  many steps (about 7e-4 on some parameters after 32 steps at lr 1e-2)."""
  workdir = str(tmp_path_factory.mktemp("seg_ref"))
  config = make_config()
  data = toy_set(64, seed=0)
  short = seg_lib.train(config, workdir, data, progress=False, stop_at=SHORT)
  assert short["step"] == SHORT
  result = seg_lib.train(config, workdir, data, progress=False)
  result["short"] = short["models"]
  return config, data, workdir, result


def test_learns_the_toy_task(reference):
  config, _, workdir, result = reference
  assert result["stacked"] and result["step"] == EPOCHS * STEPS_PER_EPOCH
  image, mask = toy_set(32, seed=1)  # held out
  graphdef, state = seg_lib.init_state(config, config.seg.seeds)
  untrained = seg_lib._unstack(graphdef, state, config.seg.seeds)
  for before, after in zip(untrained, result["models"]):
    d0 = mean_dice(seg_lib.predict(before, image, batch_size=16), mask)
    d1 = mean_dice(seg_lib.predict(after, image, batch_size=16), mask)
    assert d1 > 0.8 and d1 > d0 + 0.5, (before.seed, d0, d1)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "seeds_0_1",
                                                   "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(4, 33, 4))
  assert {"loss", "loss_seed0", "loss_seed1", "images_per_s"} <= rows[-1].keys()
  assert rows[-1]["loss"] < rows[0]["loss"]


def test_predict_uses_running_averages_and_any_batch(reference):
  config, data, _, result = reference
  model = result["models"][0]
  image = data[0][:5]
  a = seg_lib.predict(model, image, batch_size=2)  # padded last batch
  b = seg_lib.predict(model, image, batch_size=8)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # Eval mode: one image's prediction does not depend on the others.
  np.testing.assert_allclose(seg_lib.predict(model, image[:1]), a[:1],
                             atol=1e-5)
  assert a.shape == (5, SIZE, SIZE, 1) and 0 <= a.min() and a.max() <= 1


def test_load_reads_the_trained_seeds(reference):
  config, _, workdir, result = reference
  for loaded, trained in zip(seg_lib.load(config, workdir), result["models"]):
    assert loaded.seed == trained.seed
    assert_same_model(loaded, trained, atol=0)
  with pytest.raises(errors.UserError, match="seeds"):
    seg_lib.load(make_config(seeds=(5,)), workdir)


def test_stacked_seeds_equal_each_seed_alone(reference, tmp_path):
  _, data, _, result = reference
  alone = seg_lib.train(make_config(seeds=(1,)), str(tmp_path), data,
                        progress=False, stop_at=SHORT)
  assert not alone["stacked"]
  assert os.path.isdir(tmp_path / "seed_1" / "checkpoints")
  assert_same_model(alone["models"][0], result["short"][1])
  # Seeds differ from each other (init, order, flips): not one model twice.
  a, b = flat(result["short"][0]), flat(result["short"][1])
  assert any(not np.allclose(a[k], b[k]) for k in a)


def test_resume_after_a_stop_equals_an_uninterrupted_run(reference, tmp_path):
  config, data, workdir, result = reference
  whole = seg_lib.train(config, str(tmp_path), data, progress=False)
  assert whole["step"] == result["step"] == EPOCHS * STEPS_PER_EPOCH
  for a, b in zip(whole["models"], result["models"]):
    assert_same_model(a, b, atol=1e-6)  # the same program: rounding alike
  rows = lambda d: [json.loads(l)["step"]
                    for l in open(os.path.join(d, "seeds_0_1", "metrics.jsonl"))]
  assert rows(workdir) == rows(str(tmp_path))  # one row per logged step


def test_a_step_budget_counts_steps_and_a_longer_one_continues_the_run(reference, tmp_path):
  config, data, workdir, result = reference
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  config = make_config()
  config.seg.budget = "steps"
  # How long is not part of a seed group's identity: the epoch rule's run
  # is this budget's at its step count, and more steps continue it.
  config.seg.steps = EPOCHS * STEPS_PER_EPOCH + 6
  assert seg_lib.total_steps(config.seg, 64) == EPOCHS * STEPS_PER_EPOCH + 6
  assert seg_lib.total_steps(make_config().seg, 64) == EPOCHS * STEPS_PER_EPOCH
  longer = seg_lib.train(config, copy, data, progress=False)
  assert longer["step"] == longer["total_steps"] == EPOCHS * STEPS_PER_EPOCH + 6
  rows = [json.loads(l)["step"] for l in open(os.path.join(copy, "seeds_0_1",
                                                           "metrics.jsonl"))]
  assert rows[-3:] == [32, 36, 38]  # continued from the epoch run's 32.
  config.seg.steps = 0
  with pytest.raises(errors.ConfigError, match="config.seg.steps"):
    seg_lib.validate(config)
  config.seg.steps, config.seg.budget = 10, "minutes"
  with pytest.raises(errors.ConfigError, match="config.seg.budget"):
    seg_lib.validate(config)


_TWO_DEVICES = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from dfgm_jax import platform; platform.apply_xla_flags()
import jax, numpy as np
assert jax.device_count() == 2, jax.devices()
import test_segmentation_train as t
from dfgm_jax.train import segmentation as seg_lib
r = seg_lib.train(t.make_config(), {workdir!r}, t.toy_set(64, seed=0),
                  progress=False, stop_at=t.SHORT)
out = {{}}
for m in r["models"]:
  out.update({{f"{{m.seed}}{{k}}": v for k, v in t.flat(m).items()}})
np.savez({out!r}, **out)
"""


def test_two_devices_train_what_one_does(reference, tmp_path):
  _, _, _, result = reference
  out = str(tmp_path / "params.npz")
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  script = _TWO_DEVICES.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                               workdir=str(tmp_path / "w"), out=out)
  r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(out)
  for m in result["short"]:
    for k, v in flat(m).items():
      # All-reduced gradients and batch statistics round differently.
      np.testing.assert_allclose(got[f"{m.seed}{k}"], v, atol=1e-4, rtol=1e-4,
                                 err_msg=k)


def test_another_run_in_the_workdir_is_refused(reference):
  config, data, workdir, _ = reference
  other = make_config()
  other.seg.lr = 1e-3
  with pytest.raises(errors.RunMismatch, match="seg.lr"):
    seg_lib.train(other, workdir, data, progress=False)
  image, mask = data
  with pytest.raises(errors.RunMismatch, match="sha256"):
    seg_lib.train(config, workdir, (image[:-8], mask[:-8]), progress=False)
  # A seed alone in a workdir whose stacked group is another run's.
  alone = make_config(seeds=(0,))
  alone.seg.lr = 1e-3
  with pytest.raises(errors.RunMismatch, match="seeds_0_1.*seg.lr"):
    seg_lib.train(alone, workdir, data, progress=False)
  assert not os.path.exists(os.path.join(workdir, "seed_0"))


def _fake_group(calls, oom=False, preempted=False):
  def fake(config, config_json, group_dir, data, seeds, mesh, **kw):
    del config, config_json, data, mesh, kw
    calls.append((os.path.basename(group_dir), list(seeds)))
    if oom and len(seeds) > 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                         "allocate 1.2G")
    return {"models": [seg_lib.SegModel(s, None, None, None) for s in seeds],
            "step": 32, "compile_s": 0.0, "metrics": {},
            "preempted": preempted}
  return fake


def test_overwrite_removes_every_seed_group(monkeypatch, tmp_path):
  for group in ("seeds_0_1", "seed_7"):
    os.makedirs(tmp_path / group / "checkpoints" / "8")
    (tmp_path / group / "run.json").write_text('{"identity": {"seg": 1}}')
  (tmp_path / "notes.txt").write_text("the user's")
  calls = []
  monkeypatch.setattr(seg_lib, "_train_group", _fake_group(calls))
  image, mask = toy_set(16, seed=0)
  with pytest.raises(errors.RunMismatch):
    seg_lib.train(make_config(), str(tmp_path), (image, mask), progress=False)
  assert not calls
  seg_lib.train(make_config(), str(tmp_path), (image, mask), progress=False,
                overwrite=True)
  assert calls == [("seeds_0_1", [0, 1])]
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # the fake trains nothing


def test_out_of_memory_falls_back_to_one_seed_at_a_time(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(seg_lib, "_train_group", _fake_group(calls, oom=True))
  image, mask = toy_set(16, seed=0)
  result = seg_lib.train(make_config(seeds=(3, 4)), str(tmp_path),
                         (image, mask), progress=False)
  assert calls == [("seeds_3_4", [3, 4]), ("seed_3", [3]), ("seed_4", [4])]
  assert not result["stacked"]
  assert [m.seed for m in result["models"]] == [3, 4]

  def broken_group(*a, **kw):
    raise ValueError("a bug, not memory")

  monkeypatch.setattr(seg_lib, "_train_group", broken_group)
  with pytest.raises(ValueError, match="a bug"):
    seg_lib.train(make_config(seeds=(3, 4)), str(tmp_path), (image, mask),
                  progress=False)
  # stack_seeds=sequential: one at a time from the start.
  calls.clear()
  monkeypatch.setattr(seg_lib, "_train_group", _fake_group(calls))
  config = make_config(seeds=(3, 4))
  config.seg.stack_seeds = "sequential"
  seg_lib.train(config, str(tmp_path), (image, mask), progress=False)
  assert calls == [("seed_3", [3]), ("seed_4", [4])]
  # A preemption (SIGTERM) stops the run after saving, not the seed only.
  calls.clear()
  monkeypatch.setattr(seg_lib, "_train_group",
                      _fake_group(calls, preempted=True))
  result = seg_lib.train(config, str(tmp_path), (image, mask), progress=False)
  assert calls == [("seed_3", [3])] and result["preempted"]


def test_settings_out_of_range_are_refused(tmp_path):
  image, mask = toy_set(16, seed=0)
  for field, value, match in (("loss", "dice", "seg.loss"),
                              ("batch_size", 32, "16 training slices"),
                              ("seeds", (1, 1), "seg.seeds"),
                              ("depth", 6, "image_size >= 64")):
    config = make_config()
    config.seg[field] = value
    with pytest.raises(errors.ConfigError, match=match):
      seg_lib.train(config, str(tmp_path), (image, mask), progress=False)
  config = make_config()
  config.data.modalities = ("t1", "t2")
  with pytest.raises(errors.ConfigError, match="modalities.*expects"):
    seg_lib.train(config, str(tmp_path), (image, mask), progress=False)
  assert not os.listdir(tmp_path)  # refused before any output


def test_epochs_are_permutations_per_seed():
  image, mask = toy_set(20, seed=0)
  image[:, 0, 0, 0] = np.arange(20)  # tag each slice
  data = seg_lib.from_arrays(image, mask, batch_size=8)
  assert data.num_examples == 20

  def epoch(seed, e):
    return np.concatenate([data.batch_fn(seed, 2 * e + i)["image"][:, 0, 0, 0]
                           for i in range(2)])  # 20 // 8 = 2 steps

  for seed in (0, 1):
    for e in (0, 1):
      tags = epoch(seed, e)
      assert len(set(tags.tolist())) == 16  # no slice twice in an epoch
  assert not np.array_equal(epoch(0, 0), epoch(1, 0))
  assert not np.array_equal(epoch(0, 0), epoch(0, 1))
  np.testing.assert_array_equal(epoch(0, 1), epoch(0, 1))  # pure


def test_losses_and_flip():
  mask = np.zeros((2, 4, 4, 1), np.float32)
  mask[0, :2] = 1.0
  logits = np.where(mask > 0, 40.0, -40.0).astype(np.float32)
  # A confident, correct prediction: no loss; image 1 is empty on both sides.
  assert float(seg_lib.soft_dice_loss(logits, mask)) < 1e-5
  assert float(seg_lib.bce_with_logits(logits, mask)) < 1e-6
  # All logits 0: BCE = log 2 per pixel; soft Dice of image 0 = 2*4 / (16+8).
  zeros = np.zeros_like(logits)
  np.testing.assert_allclose(seg_lib.bce_with_logits(zeros, mask), np.log(2),
                             rtol=1e-6)
  dice0 = 2 * 0.5 * 8 / (0.5 * 16 + 8)
  dice1 = 0.0  # empty mask, non-empty prediction
  np.testing.assert_allclose(seg_lib.soft_dice_loss(zeros, mask),
                             1 - (dice0 + dice1) / 2, rtol=1e-5)
  np.testing.assert_allclose(
      seg_lib.loss_value("bce_dice", zeros, mask),
      np.log(2) + 1 - (dice0 + dice1) / 2, rtol=1e-5)
  image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
  key = jax.random.key(0)
  fi, fm = seg_lib.hflip(key, image, mask.transpose(0, 2, 1, 3), 1.0)
  np.testing.assert_array_equal(fi, image[:, :, ::-1])
  np.testing.assert_array_equal(fm, mask.transpose(0, 2, 1, 3)[:, :, ::-1])
  same, _ = seg_lib.hflip(key, image, mask, 0.0)
  np.testing.assert_array_equal(same, image)


def test_processes_split_each_global_batch_in_order(monkeypatch):
  image, mask = toy_set(20, seed=0)
  image[:, 0, 0, 0] = np.arange(20)
  whole = seg_lib.from_arrays(image, mask, batch_size=8)
  parts = []
  for pid in (0, 1):
    monkeypatch.setattr(seg_lib.jax, "process_count", lambda: 2)
    monkeypatch.setattr(seg_lib.jax, "process_index", lambda pid=pid: pid)
    parts.append(seg_lib.from_arrays(image, mask, batch_size=8))
  for step in (0, 1, 5):
    halves = [p.batch_fn(3, step)["image"][:, 0, 0, 0] for p in parts]
    assert [len(h) for h in halves] == [4, 4]
    # Row i of the global batch is the same slice (its flip is drawn per row).
    np.testing.assert_array_equal(np.concatenate(halves),
                                  whole.batch_fn(3, step)["image"][:, 0, 0, 0])


def test_auto_stacks_the_seeds_on_cpus_only():
  # Measured: stacked 1.03-1.23x on the 2-core CPU, 0.34x on an H200.
  assert seg_lib.stacks_seeds("auto", "cpu")
  assert not seg_lib.stacks_seeds("auto", "gpu") and not seg_lib.stacks_seeds("auto", "tpu")
  assert seg_lib.stacks_seeds("stacked", "gpu")
  assert not seg_lib.stacks_seeds("sequential", "cpu")
