"""Tests: downsampled phantom volumes, 32 x 32 slices."""

import ml_collections

from configs import data
from configs import diffusion


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.phantom = ml_collections.ConfigDict()
  config.phantom.version = "2020"
  config.phantom.num_cases = 8
  config.phantom.seed = 0
  config.phantom.scale = 0.4
  config.data = data.get_data_config()
  config.data.image_size = 32
  config.data.min_tumor_area_mm2 = 50.0
  config.data.healthy_max = 40
  diffusion.add_diffusion_sections(config)
  config.model.preset = "tiny"
  config.diffusion.num_steps = 100
  config.train.batch_size = 8
  config.train.num_steps = 20
  config.train.warmup_steps = 5
  config.train.lr = 1e-3
  config.train.log_every = 5
  config.train.checkpoint_every = 10
  config.train.async_checkpoints = False
  config.train.reader = "synthetic"
  return config
