"""Blended sampling of 8 examples on 1, 4 and 8 devices, batch 8 and 4; .npy out.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8. The tiny UNet's
parameters are perturbed so that the network's output is not zero.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out_dir", required=True)
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dfgm_jax.diffusion import sampler, schedule  # pylint: disable=g-import-not-at-top
  from dfgm_jax.models import unet  # pylint: disable=g-import-not-at-top
  from dfgm_jax.synthesis import masks  # pylint: disable=g-import-not-at-top

  cfg = unet.get_preset("tiny")
  graphdef, params, rest = nnx.split(unet.create_model(cfg, 0), nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(tree, [l + 0.05 * rng.normal(size=l.shape).astype(np.float32)
                                     for l in leaves])
  examples = [input_pipeline.synthetic_example(i, 32) for i in range(8)]
  y = np.stack([e["image"] for e in examples])
  tumor = np.stack([e["mask"] for e in examples]).astype(np.float32)
  ring = np.asarray(masks.ring(jnp.asarray(tumor), 2))
  sched = schedule.make_schedule("linear", 100)
  scfg = sampler.SamplerConfig(steps=10, jump_length=2, resamples=2)

  @jax.jit
  def run(params, y, ring, tumor, idx):
    def eps_fn(x, t, c, r, m):
      return nnx.merge(graphdef, params, rest)(x, t, c, r, m)
    return sampler.blend_sample(eps_fn, sched, scfg, y, ring, tumor,
                                jax.random.key(42), idx)

  # (devices, batch): the same 8 examples, in one batch or in two.
  for devices, batch in ((1, 8), (8, 8), (1, 4), (4, 4)):
    data = NamedSharding(parallel.make_mesh(devices), P("data"))
    outs = []
    for lo in range(0, 8, batch):
      sl = slice(lo, lo + batch)
      put = lambda a, sl=sl: jax.device_put(a[sl], data)
      outs.append(np.asarray(run(params, put(y), put(ring), put(tumor),
                                 put(np.arange(8, dtype=np.int32)))))
    np.save(os.path.join(args.out_dir, f"{devices}_{batch}.npy"),
            np.concatenate(outs))
  print("ok")


if __name__ == "__main__":
  main()
