"""The synthesis sampler on 8 examples on 1, 4 and 8 devices, batch 8 and 4; .npy out.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8. The sampler is
Denoiser.sampler (what synthesis runs: dfgm mode, batch sharded over the
mesh); the tiny UNet's parameters are perturbed so that the network's output
is not zero.
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
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from data_pipeline import input_pipeline  # pylint: disable=g-import-not-at-top
  from dfgm_jax import parallel  # pylint: disable=g-import-not-at-top
  from dfgm_jax.diffusion import denoiser  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()  # tiny UNet, 32 px, T = 100 (linear).
  config.mask.r_out_240 = 15.0  # 2 px at 32.
  config.sampler.steps, config.sampler.jump_length, config.sampler.resamples = 10, 2, 2
  model = denoiser.Denoiser.init(config, seed=0)
  assert model.r_out == 2
  leaves, tree = jax.tree.flatten(model.params)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(tree, [l + 0.05 * rng.normal(size=l.shape).astype(np.float32)
                                     for l in leaves])
  tumors = [input_pipeline.synthetic_example(i, 32) for i in range(8)]
  healthy = [input_pipeline.synthetic_example(8 + i, 32, tumor=False) for i in range(8)]
  x = np.stack([e["image"] for e in tumors])
  tumor = np.stack([e["mask"] for e in tumors]).astype(np.float32)
  h = np.stack([e["image"] for e in healthy])

  # (devices, batch): the same 8 examples, in one batch or in two.
  for devices, batch in ((1, 8), (8, 8), (1, 4), (4, 4)):
    mesh = parallel.make_mesh(devices)
    run = model.sampler("dfgm", 42, mesh)
    data = NamedSharding(mesh, P("data"))
    outs = []
    for lo in range(0, 8, batch):
      sl = slice(lo, lo + batch)
      put = lambda a, sl=sl: jax.device_put(a[sl], data)
      outs.append(np.asarray(run(jax.device_put(params, parallel.replicated(mesh)),
                                 put(x), put(tumor), put(h),
                                 put(np.arange(8, dtype=np.int32)))))
    np.save(os.path.join(args.out_dir, f"{devices}_{batch}.npy"),
            np.concatenate(outs))
  print("ok")


if __name__ == "__main__":
  main()
