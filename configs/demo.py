"""The README's main job: phantom BraTS 2020 data, CPU minutes."""

import ml_collections

from configs import data
from configs import diffusion


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.phantom = ml_collections.ConfigDict()
  config.phantom.version = "2020"
  config.phantom.num_cases = 12
  config.phantom.seed = 0
  config.phantom.scale = 1.0  # full BraTS grid 240 x 240 x 155.
  config.data = data.get_data_config()
  config.data.centers = "CBICA,TCIA"
  config.data.healthy_max = 200
  diffusion.add_diffusion_sections(config)
  config.model.preset = "tiny"
  config.data.image_size = 64
  config.train.batch_size = 8
  config.train.num_steps = 300
  config.train.warmup_steps = 50
  config.train.lr = 1e-3
  config.train.log_every = 50
  config.train.checkpoint_every = 100
  return config
