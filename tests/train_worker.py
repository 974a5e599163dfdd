"""A training run used by the multi-device / multi-process / resume tests.

  python tests/train_worker.py --workdir=W --out=params.npz [--devices=N]
      [--num_processes=2 --process_id=0 --port=P] [--num_steps=...]

Trains the tiny preset on deterministic global batches (synthetic slices
indexed by step); each process feeds its contiguous part of the global batch.
Process 0 writes the final parameters and EMA to --out.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--devices", type=int, default=None)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--num_steps", type=int, default=6)
  p.add_argument("--steps_per_dispatch", type=int, default=1)
  p.add_argument("--checkpoint_every", type=int, default=2)
  args = p.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    jax.distributed.initialize(f"localhost:{args.port}", args.num_processes,
                               args.process_id)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dfgm_jax.train import diffusion  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.train.num_steps = args.num_steps
  config.train.steps_per_dispatch = args.steps_per_dispatch
  config.train.checkpoint_every = args.checkpoint_every
  config.train.log_every = args.steps_per_dispatch
  config.model.overrides.dropout = 0.0
  global_batch = config.train.batch_size
  size = config.data.image_size

  def global_batch_for(step):
    rng = np.random.default_rng(step)
    items = [input_pipeline.synthetic_example(int(i), size, tumor=bool(i % 2))
             for i in rng.integers(0, 1000, global_batch)]
    return {"image": np.stack([e["image"] for e in items]),
            "mask": np.stack([e["mask"] for e in items]).astype(np.float32),
            "is_tumor": np.array([int(e["mask"].any()) for e in items], np.int32)}

  n = jax.process_count()
  share = global_batch // n
  lo = jax.process_index() * share

  def batch_fn(step):
    return {k: v[lo:lo + share] for k, v in global_batch_for(step).items()}

  mesh = parallel.make_mesh(args.devices)
  result = diffusion.train(config, args.workdir, batch_fn, mesh=mesh,
                           progress=False)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flat = {}
  for name in ("params", "ema"):
    tree = multihost_utils.process_allgather(result["state"][name], tiled=True) \
        if n > 1 else jax.device_get(result["state"][name])
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
  if jax.process_index() == 0:
    np.savez(args.out, step=result["step"], **flat)
    print(f"done step={result['step']} devices={mesh.size}")


if __name__ == "__main__":
  main()
