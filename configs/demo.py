"""The README's main job: phantom BraTS 2020 data, CPU minutes.

The tiny CPU model of configs/tiny.py, on full-size phantom volumes (12
cases) and 64 x 64 slices, trained for a few hundred steps.
"""

import ml_collections

from configs import data
from configs import diffusion
from configs import tiny


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = tiny.get_config()
  config.phantom.num_cases = 12
  config.phantom.scale = 1.0  # full BraTS grid 240 x 240 x 155.
  config.data = data.get_data_config()
  config.data.centers = "CBICA,TCIA"
  config.data.healthy_max = 200
  config.data.image_size = 64
  config.diffusion = diffusion.get_diffusion_config()  # T = 1000
  config.train.reader = "grain"
  config.train.center = "CBICA"
  config.train.num_steps = 300
  config.train.warmup_steps = 50
  config.train.log_every = 50
  config.train.checkpoint_every = 100
  config.train.async_checkpoints = True
  # Synthesis: a short blended DDIM run (the paper-scale default is 195 NFE).
  config.sampler.steps = 25
  config.sampler.resamples = 1
  config.sampler.batch_size = 8
  return config
