"""Tests: downsampled phantom volumes, 32 x 32 slices."""

import ml_collections

from configs import data


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
  return config
