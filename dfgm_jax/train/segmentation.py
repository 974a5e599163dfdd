"""Training the downstream segmenter (ALGORITHM.md 7): seeds stacked, data-parallel.

Banner sections as in diffusion.py: data, state, update step, run identity,
loop, prediction. The loop's pieces (workdir claim, restore, AOT compile,
run steps with metrics, checkpoints and preemption) are train/loop.py's.

Seeds are trained together: the states of a run's seeds are stacked on a
leading axis and one compiled step updates all of them (jax.vmap over
parameters, BatchNorm statistics, optimizer state and key), so a small
network fills the accelerator once instead of n times. Each seed's
trajectory depends on its seed only (initialisation, data order, flips), so
stacked and one-at-a-time training give the same parameters up to float
rounding (the batched convolutions round differently, and Adam amplifies
that over many steps: 2e-6 after 4 steps, up to 7e-4 on a few parameters
after 32 steps of the tests' toy run); config.seg.stack_seeds=sequential trains one seed at a time, and a
stacked run that runs out of memory falls back to that by itself.

Layout of a workdir: one folder per group of seeds trained together,
seeds_0_1_2/ when stacked, seed_<s>/ for a seed trained alone; each is a
trainer's workdir as loop.py makes it (run.json with the group's identity,
checkpoints/, metrics.jsonl, tensorboard/). A rerun resumes its group; a
group of another config is refused (errors.RunMismatch) unless overwritten.

A batch for the step is (B, n_seeds, S, S, C): the global batch axis first,
as loop.batch_sharding shards it over `data` (axis 1 after the k axis), the
seeds next to it. BatchNorm's batch statistics are over the global batch
(XLA all-reduces them), so 1 and n devices train the same model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from typing import Callable, Sequence

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfgm_jax import checkpoint as ckpt_lib
from dfgm_jax import errors
from dfgm_jax import parallel
from dfgm_jax import paths
from dfgm_jax import stage_io
from dfgm_jax.models import seg_unet
from dfgm_jax.train import loop
from dfgm_jax.train import metrics as metrics_lib

LOSSES = ("bce", "bce_dice")
DICE_EPS = 1e-6  # The reference's soft-Dice smoothing.

# --- Data ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainData:
  """A training set as the trainer reads it.

  Attributes:
    batch_fn: (seed, step) -> this process's part of the global batch for
      that seed and step, {"image": (b,S,S,C) float32 in [-1, 1], "mask":
      (b,S,S,1) in {0, 1}}, b = batch_size / process_count. Pure in its
      arguments, so a resumed run replays exactly.
    num_examples: slices in the set; an epoch is num_examples // batch_size
      steps (total_steps: how many a run trains).
    identity: what defines the set (names and fingerprints): part of the
      run's identity, so another set in the same workdir is refused.
  """

  batch_fn: Callable[[int, int], dict]
  num_examples: int
  identity: dict


def fingerprint(*arrays: np.ndarray) -> str:
  """sha256 of the arrays' shapes, dtypes and bytes (16 hex digits)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()[:16]


def from_arrays(image: np.ndarray, mask: np.ndarray, batch_size: int, *,
                name: str = "arrays") -> TrainData:
  """TrainData over in-memory slices, shuffled per seed and epoch.

  Every process holds all the slices (a few hundred at paper scale) and
  takes its contiguous part of each global batch. An epoch is a permutation
  drawn from (seed, epoch); its last num_examples % batch_size slices are
  left out (a different few each epoch), so every step has the same shape.

  Args:
    image: (N,S,S,C) float32 in [-1, 1].
    mask: (N,S,S,1) (or (N,S,S)) in {0, 1}.
    batch_size: the global batch size.
    name: a name for the set in the run identity.
  """
  image = np.asarray(image, np.float32)
  mask = np.asarray(mask, np.float32)
  if mask.ndim == 3:
    mask = mask[..., None]
  if image.ndim != 4 or mask.shape != image.shape[:3] + (1,):
    raise errors.UserError(
        f"training slices: image {image.shape} and mask {mask.shape}; expected "
        "(N,S,S,C) and (N,S,S,1)")
  n = image.shape[0]
  if n < batch_size:
    raise errors.ConfigError(
        f"config.seg.batch_size={batch_size}: larger than the {n} training "
        "slices")
  steps_per_epoch = n // batch_size
  procs, pid = jax.process_count(), jax.process_index()
  share = batch_size // procs

  @functools.lru_cache(maxsize=8)
  def order(seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)

  def batch_fn(seed: int, step: int) -> dict:
    epoch, i = divmod(step, steps_per_epoch)
    idx = order(seed, epoch)[i * batch_size:(i + 1) * batch_size]
    # This process's rows of the global batch, in the global order (the
    # flips are drawn per row): any process count trains the same batches.
    idx = idx[pid * share:(pid + 1) * share]
    return {"image": image[idx], "mask": mask[idx]}

  return TrainData(batch_fn=batch_fn, num_examples=n,
                   identity={"name": name, "num_examples": n,
                             "sha256": fingerprint(image, mask)})


def _stacked_batch_fn(data: TrainData, seeds: Sequence[int]):
  """step -> {"image": (b, n_seeds, S,S,C), "mask": (b, n_seeds, S,S,1)}."""

  def batch_fn(step: int) -> dict:
    items = [data.batch_fn(int(s), step) for s in seeds]
    return {k: np.stack([np.asarray(it[k], np.float32) for it in items], axis=1)
            for k in ("image", "mask")}

  return batch_fn


# --- State ---------------------------------------------------------------------


def make_optimizer(seg) -> optax.GradientTransformation:
  """Adam, constant learning rate (paper)."""
  return optax.adam(seg.lr)


def _split(model):
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, params, stats


def init_state(config, seeds: Sequence[int]):
  """(graphdef, state): the seeds' states stacked on a leading axis.

  state = {step: (), params, batch_stats, opt_state, key: (n, 2)}; every
  leaf but `step` has the seeds on axis 0. Seed s initialises the network
  from s and draws its flips from key(s) folded with the step.
  """
  cfg = seg_unet.config_from(config)
  tx = make_optimizer(config.seg)
  graphdef, params, stats = None, [], []
  for seed in seeds:
    graphdef, p, s = _split(seg_unet.create_model(cfg, int(seed)))
    params.append(p)
    stats.append(s)

  def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                        *trees)

  params, stats = stack(params), stack(stats)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "batch_stats": stats,
      "opt_state": jax.vmap(tx.init)(params),
      "key": jnp.stack([jax.random.key_data(
          jax.random.fold_in(jax.random.key(int(s)), 1)) for s in seeds]),
  }
  return graphdef, state


# --- Update step ---------------------------------------------------------------


def bce_with_logits(logits, mask):
  """Mean binary cross-entropy over pixels (PyTorch's BCEWithLogitsLoss)."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, mask))


def soft_dice_loss(logits, mask):
  """1 - mean over images of the soft Dice of sigmoid(logits) (the reference's
  dice_loss; an image with empty mask and prediction scores 1)."""
  p = jax.nn.sigmoid(logits)
  axes = tuple(range(1, p.ndim))
  inter = jnp.sum(p * mask, axis=axes)
  sets = jnp.sum(p, axis=axes) + jnp.sum(mask, axis=axes)
  sets = jnp.where(sets == 0, inter, sets)
  return 1.0 - jnp.mean((2.0 * inter + DICE_EPS) / (sets + DICE_EPS))


def loss_value(name: str, logits, mask):
  if name == "bce":
    return bce_with_logits(logits, mask)
  return bce_with_logits(logits, mask) + soft_dice_loss(logits, mask)


def hflip(key, image, mask, p: float):
  """Flips each example (image and mask together) with probability p."""
  flip = jax.random.uniform(key, (image.shape[0],)) < p
  f = flip[:, None, None, None]
  return (jnp.where(f, image[:, :, ::-1], image),
          jnp.where(f, mask[:, :, ::-1], mask))


def make_train_step(graphdef, config, seeds: Sequence[int]) -> Callable:
  """Returns train_step(state, batches) -> (state, metrics).

  `batches`: image (1, B, n, S,S,C), mask (1, B, n, S,S,1) (one step per
  dispatch, the loop's leading k axis). Metrics: loss and grad_norm (means
  over the seeds) and loss_seed<s> per seed.
  """
  seg = config.seg
  tx = make_optimizer(seg)
  loss_name, p_flip = seg.loss, float(seg.hflip)

  def loss_fn(params, stats, image, mask, key):
    image, mask = hflip(key, image, mask, p_flip)
    # copy=True: fresh Variables of this trace, which BatchNorm may update
    # (merging without a copy under grad raises TraceContextError).
    model = nnx.merge(graphdef, params, stats, copy=True)
    logits = model(image, train=True)
    return loss_value(loss_name, logits, mask), nnx.state(model, nnx.BatchStat)

  def one_seed(params, stats, opt_state, key_data, step, image, mask):
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, image, mask, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, stats, opt_state, loss, optax.global_norm(grads)

  def train_step(state, batches):
    # Seeds first: (B, n, ...) -> (n, B, ...).
    image = jnp.moveaxis(batches["image"][0], 1, 0)
    mask = jnp.moveaxis(batches["mask"][0], 1, 0)
    params, stats, opt_state, loss, gnorm = jax.vmap(
        one_seed, in_axes=(0, 0, 0, 0, None, 0, 0))(
            state["params"], state["batch_stats"], state["opt_state"],
            state["key"], state["step"], image, mask)
    new_state = dict(state, step=state["step"] + 1, params=params,
                     batch_stats=stats, opt_state=opt_state)
    metrics = {"loss": jnp.mean(loss), "grad_norm": jnp.mean(gnorm)}
    metrics.update({f"loss_seed{s}": loss[i] for i, s in enumerate(seeds)})
    return new_state, metrics

  return train_step


# --- Run identity ----------------------------------------------------------------

# Fields of config.seg that may change between reruns of one run: how long
# (epochs, steps and the budget rule that picks one of them: the data order
# and flips depend on the seed and the step only, so a longer run continues
# a shorter one), how often to log and save, how to run. Everything else in config.seg, the
# modalities, the image size and the training set define the run; a seed
# group's identity adds its seeds (so seeds may be added to a run later).
_FREE_FIELDS = ("epochs", "steps", "budget", "log_every", "checkpoint_every_epochs",
                "checkpoints_to_keep", "async_checkpoints", "tensorboard",
                "stack_seeds", "seeds")


def run_identity(config_json: dict, data_identity: dict,
                 seeds: Sequence[int] | None = None) -> dict:
  """The defining fields of a segmentation run (config as JSON).

  With `seeds`, the identity of that seed group (a group folder's run.json).
  """
  identity = loop.identity_of(config_json, ("seg",), {"seg": _FREE_FIELDS})
  data = config_json.get("data", {})
  identity["data"] = {"modalities": data.get("modalities"),
                      "image_size": data.get("image_size")}
  identity["train_set"] = data_identity
  if seeds is not None:
    identity["seeds"] = [int(s) for s in seeds]
  return stage_io.normalise(identity)


def _check_groups(workdir: str, identity: dict) -> None:
  """Refuses a workdir whose seed groups were trained as another run.

  Each group claims its own folder (loop.claim_workdir), which guards that
  group only; this compares the others too, so that e.g. seeds trained one
  at a time are not mixed with a stacked group of another config.

  Raises:
    errors.RunMismatch: a group with checkpoints and another identity.
  """
  wd = epath.Path(workdir)
  if not wd.is_dir():
    return
  for p in sorted(wd.iterdir()):
    record = stage_io.read_json(str(p / loop.RUN_RECORD)) if (
        p.is_dir() and _is_group_dir(p.name)) else None
    if not record or not (p / loop.CHECKPOINTS).is_dir():
      continue
    stored = dict(record.get("identity", {}))
    stored.pop("seeds", None)
    diffs = stage_io.differences(stored, identity)
    if diffs:
      raise errors.RunMismatch(stage_io.mismatch_message(
          "a segmentation training run", str(p / loop.RUN_RECORD), diffs,
          "Pass --overwrite to delete that run's seed groups, or use another "
          "--workdir."))


def group_name(seeds: Sequence[int]) -> str:
  """A seed group's folder: seed_<s> alone, seeds_<a>_<b>_... stacked."""
  if len(seeds) == 1:
    return f"seed_{int(seeds[0])}"
  return "seeds_" + "_".join(str(int(s)) for s in seeds)


def _is_group_dir(name: str) -> bool:
  return name.startswith("seed_") or name.startswith("seeds_")


# --- Loop ----------------------------------------------------------------------

# config.seg.budget: how long a run trains. "steps": config.seg.steps
# optimizer steps whatever the training set's size, so the before and the
# after run of a comparison get the same number of updates (on the demo, with
# a fixed epoch count the run with the synthetic set added took ~3x the
# steps, and that alone read as a gain). "epochs": the paper's fixed epoch
# count, config.seg.epochs * (num_examples // batch_size) steps.
BUDGETS = ("steps", "epochs")


def total_steps(seg, num_examples: int) -> int:
  """Optimizer steps a run of `num_examples` training slices takes."""
  if seg.budget == "steps":
    return int(seg.steps)
  return int(seg.epochs) * (int(num_examples) // int(seg.batch_size))


def validate(config, data: TrainData | None = None) -> None:
  """Refuses settings out of range before any compile or I/O.

  Raises:
    errors.ConfigError: naming the field.
  """
  seg = config.seg
  seg_unet.config_from(config)  # width, depth, dtype.
  if seg.loss not in LOSSES:
    raise errors.ConfigError(
        f"config.seg.loss={seg.loss!r}: must be one of {LOSSES}")
  if seg.budget not in BUDGETS:
    raise errors.ConfigError(
        f"config.seg.budget={seg.budget!r}: must be one of {BUDGETS}")
  for name in ("batch_size", "epochs", "steps"):
    if int(getattr(seg, name)) < 1:
      raise errors.ConfigError(
          f"config.seg.{name}={getattr(seg, name)}: must be >= 1")
  if not 0.0 <= float(seg.hflip) <= 1.0:
    raise errors.ConfigError(f"config.seg.hflip={seg.hflip}: must be in [0, 1]")
  if not seg.seeds or len(set(seg.seeds)) != len(seg.seeds):
    raise errors.ConfigError(
        f"config.seg.seeds={tuple(seg.seeds)}: must be distinct, at least one")
  if seg.batch_size % jax.device_count():
    raise errors.ConfigError(
        f"config.seg.batch_size={seg.batch_size}: must be a multiple of the "
        f"{jax.device_count()} devices")
  size = int(config.data.image_size)
  if size < 2 ** int(seg.depth):
    raise errors.ConfigError(
        f"config.seg.depth={seg.depth}: {seg.depth} 2x down-samplings need "
        f"config.data.image_size >= {2 ** int(seg.depth)}, not {size}")
  if data is not None and data.num_examples < seg.batch_size:
    raise errors.ConfigError(
        f"config.seg.batch_size={seg.batch_size}: larger than the "
        f"{data.num_examples} training slices")
  if data is not None:
    shape = tuple(np.shape(data.batch_fn(int(seg.seeds[0]), 0)["image"]))[1:]
    want = (size, size, len(config.data.modalities))
    if shape != want:
      raise errors.ConfigError(
          f"config.data.image_size={size}, config.data.modalities="
          f"{tuple(config.data.modalities)}: the training slices are "
          f"{shape} (H, W, modalities), the network expects {want}")


def stacks_seeds(mode: str, platform: str) -> bool:
  """Whether config.seg.stack_seeds=`mode` trains the seeds stacked on `platform`.

  auto stacks on CPUs only: there the stacked program compiles once (at
  0.82-1.23x the throughput, measured); on an H200 the vmapped (grouped)
  convolutions ran at 0.34x one seed at a time (launch.benchmark_train
  --config.bench.model=seg, README).
  """
  if mode == "auto":
    return platform == "cpu"
  return mode == "stacked"


def is_out_of_memory(e: BaseException) -> bool:
  """Whether an exception is an accelerator's out-of-memory error."""
  text = f"{type(e).__name__}: {e}"
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


@dataclasses.dataclass
class SegModel:
  """One trained seed: the network's graph, parameters and BatchNorm averages."""

  seed: int
  graphdef: object
  params: object
  batch_stats: object


def _unstack(graphdef, state, seeds) -> list[SegModel]:
  """Per-seed models (host arrays) from a stacked state."""

  def host(x):
    # A replicated array spanning processes is not fully addressable, but
    # each process holds all of it.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  params, stats = jax.tree.map(host, (state["params"], state["batch_stats"]))
  return [SegModel(seed=int(s), graphdef=graphdef,
                   params=jax.tree.map(lambda x, i=i: x[i], params),
                   batch_stats=jax.tree.map(lambda x, i=i: x[i], stats))
          for i, s in enumerate(seeds)]


def _train_group(config, config_json, group_dir: str, data: TrainData,
                 seeds: Sequence[int], mesh, *, progress: bool,
                 stop_at: int | None) -> dict:
  """Trains (or resumes) one group of stacked seeds in group_dir.

  Its metrics.jsonl rows hold loss and grad_norm (means over the group's
  seeds), loss_seed<s> per seed, and images_per_s counting every seed's
  images (per seed: divide by the group's size).
  """
  seg = config.seg
  loop.claim_workdir(
      group_dir, run_identity(config_json, data.identity, seeds),
      identity_fn=lambda c: run_identity(c, data.identity, seeds),
      what="a segmentation training run (seeds %s)" % list(seeds))
  spe = data.num_examples // seg.batch_size
  total = total_steps(seg, data.num_examples)
  end = total if stop_at is None else min(stop_at, total)
  graphdef, state = init_state(config, seeds)
  state = jax.device_put(state, parallel.replicated(mesh))
  checkpointer = loop.make_checkpointer(group_dir, seg)
  batch_fn = _stacked_batch_fn(data, seeds)
  writer = watcher = None
  try:
    step, state = loop.restore(checkpointer, state)
    local = loop.stack_batches(batch_fn, step, 1)
    compiled, compile_s = loop.compile_step(
        make_train_step(graphdef, config, seeds), state,
        loop.global_batches(local, mesh), mesh, name=group_name(seeds))
    writer = metrics_lib.MetricsWriter(group_dir, enabled=parallel.is_main(),
                                       tensorboard=seg.tensorboard,
                                       resume_step=step)
    watcher = ckpt_lib.PreemptionWatcher()
    result = loop.run_steps(
        compiled, state, batch_fn, mesh, start=step, end=max(end, step),
        batch_size=seg.batch_size * len(seeds), log_every=seg.log_every,
        checkpoint_every=int(seg.checkpoint_every_epochs) * spe,
        checkpointer=checkpointer,
        meta={"config": config_json, "seeds": [int(s) for s in seeds],
              "steps_per_epoch": spe},
        writer=writer, watcher=watcher, progress=progress,
        desc=f"segmenter {group_name(seeds)}", first_batches=local)
  finally:
    loop.close_all(checkpointer, writer, watcher)
  return {"models": _unstack(graphdef, result.state, seeds),
          "step": result.step, "compile_s": compile_s,
          "metrics": result.metrics, "preempted": result.preempted}


def train(config, workdir: str, data, *, mesh=None, progress: bool = True,
          stop_at: int | None = None, overwrite: bool = False) -> dict:
  """Trains (or resumes) the segmenter for every seed of config.seg.seeds.

  Args:
    config: a config with `seg` (configs/segmentation.py) and `data`
      (modalities, image_size).
    workdir: the run's folder (see the module docstring for its layout).
    data: a TrainData, or an (image, mask) pair of numpy arrays (from_arrays).
    mesh: defaults to all devices on a `data` axis.
    progress: show a progress bar (process 0).
    stop_at: stop (with a checkpoint) after this step, as if preempted; for
      tests. None runs total_steps (config.seg.budget).
    overwrite: delete another run's outputs in `workdir` instead of refusing.

  Returns:
    dict: models (a SegModel per seed trained, in config.seg.seeds order;
    fewer when a preemption stopped the run early), stacked
    (whether the seeds were trained together), steps_per_epoch, total_steps
    (the budget), step (the last group's), compile_s and metrics per group, preempted.

  Raises:
    errors.ConfigError: a setting out of range (before any compile or I/O).
    errors.RunMismatch: `workdir` holds a run with another defining config
      or training set.
  """
  seg = config.seg
  if not isinstance(data, TrainData):
    image, mask = data
    validate(config)
    data = from_arrays(image, mask, int(seg.batch_size))
  validate(config, data)
  mesh = mesh or parallel.make_mesh()
  seeds = [int(s) for s in seg.seeds]
  config_json = json.loads(config.to_json_best_effort())
  if overwrite and parallel.is_main() and epath.Path(workdir).is_dir():
    for p in epath.Path(workdir).iterdir():
      if p.is_dir() and _is_group_dir(p.name):
        if paths.is_url(str(p)):
          p.rmtree()
        else:
          shutil.rmtree(p)
  parallel.barrier("dfgm_seg_overwrite")
  _check_groups(workdir, run_identity(config_json, data.identity))

  def group(group_seeds):
    return _train_group(config, config_json,
                        os.path.join(workdir, group_name(group_seeds)), data,
                        group_seeds, mesh, progress=progress, stop_at=stop_at)

  results = None
  stacked = stacks_seeds(seg.stack_seeds, jax.devices()[0].platform) and len(seeds) > 1
  if stacked:
    try:
      results = [group(seeds)]
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      logging.warning("training the %d seeds stacked ran out of memory (%s); "
                      "training them one at a time", len(seeds), str(e)[:200])
      stacked = False
  if results is None:
    results = []
    for s in seeds:
      results.append(group([s]))
      if results[-1]["preempted"]:
        break  # saved; the rerun resumes this seed and trains the rest.
  models = [m for r in results for m in r["models"]]
  return {"models": models, "stacked": stacked,
          "steps_per_epoch": data.num_examples // seg.batch_size,
          "total_steps": total_steps(seg, data.num_examples),
          "step": results[-1]["step"],
          "compile_s": {group_name([m.seed for m in r["models"]]): r["compile_s"]
                        for r in results},
          "metrics": {group_name([m.seed for m in r["models"]]): r["metrics"]
                      for r in results},
          "preempted": any(r["preempted"] for r in results)}


def load(config, workdir: str) -> list[SegModel]:
  """The trained seeds of `workdir` (newest checkpoints), in config order.

  Reads the stacked group when it has a checkpoint, else each seed's own.

  Raises:
    errors.UserError: a seed has no checkpoint in `workdir`.
  """
  seeds = [int(s) for s in config.seg.seeds]
  out = {}
  candidates = [seeds] if len(seeds) > 1 else []
  candidates += [[s] for s in seeds]
  for group_seeds in candidates:
    if all(s in out for s in group_seeds):
      continue
    directory = os.path.join(workdir, group_name(group_seeds), loop.CHECKPOINTS)
    if not epath.Path(directory).is_dir():
      continue
    graphdef, target = init_state(config, group_seeds)
    checkpointer = ckpt_lib.Checkpointer(directory)
    try:
      step, state, _ = checkpointer.restore_latest(target)
    finally:
      checkpointer.close()
    if state is None:
      continue
    for m in _unstack(graphdef, state, group_seeds):
      out.setdefault(m.seed, m)
  missing = [s for s in seeds if s not in out]
  if missing:
    raise errors.UserError(
        f"{workdir}: no segmenter checkpoint for seeds {missing} (train it "
        "with launch.train_segmentation and the same config)")
  return [out[s] for s in seeds]


# --- Prediction ----------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _predict_fn(graphdef):
  @jax.jit
  def fn(params, stats, images):
    model = nnx.merge(graphdef, params, stats)
    return jax.nn.sigmoid(model(images, train=False))
  return fn


def predict(model: SegModel, images: np.ndarray,
            batch_size: int = 32) -> np.ndarray:
  """Tumor probabilities sigmoid(logit), (N,S,S,1) float32, eval mode.

  BatchNorm normalises with its running averages. Batches of a fixed size
  (the last one padded) so that one compile serves any N.
  """
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  fn = _predict_fn(model.graphdef)
  out = []
  for i in range(0, n, batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                              np.float32)])
    out.append(np.asarray(fn(model.params, model.batch_stats, chunk))[
        :batch_size - pad])
  return np.concatenate(out) if out else np.zeros(images.shape[:3] + (1,),
                                                  np.float32)
